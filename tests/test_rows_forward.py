"""The rows-aware forwards of a stock ``nn.Embedding`` / ``nn.Linear`` with a partial weight.

They never build the merged full-size tensor: each must give the same output
and the same gradients (for ``R``, the input and the bias) as the module's
own forward on the merged tensor, through every option that changes what
the module computes, and fall back to the merged tensor where it must.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradgate as gg
from gradgate import subtensor


def _merged_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's plain class's forward on the merged tensor (what the fast path replaces)."""
    plain: Any = type(module).__mro__[2]  # rows class -> _RowsOwner -> plain
    out: torch.Tensor = plain.forward(module, x)
    return out


def _grads(module: nn.Module, out: torch.Tensor, *extra: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in module.parameters() if p.requires_grad]
    wanted = [*params, *extra]
    weight = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    return list(torch.autograd.grad((out * weight).sum(), wanted))


def test_the_fast_forwards_are_installed_only_on_stock_classes() -> None:
    class Scaled(nn.Embedding):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return super().forward(input) * 2.0

    emb, lin, scaled = nn.Embedding(8, 3), nn.Linear(3, 8), Scaled(8, 3)
    for m in (emb, lin, scaled):
        gg.train_only(m, gg.rows("weight", [6, 7]))
    assert type(emb).forward is subtensor._rows_embedding_forward
    assert type(lin).forward is subtensor._rows_linear_forward
    assert type(scaled).forward is Scaled.forward  # its own forward, on the merged tensor
    lin_bias = nn.Linear(3, 8)
    gg.train_only(lin_bias, gg.rows("bias", [6, 7]))  # rows of the bias only
    assert type(lin_bias).forward is nn.Linear.forward


@pytest.mark.parametrize("padding_idx", [None, 1, 6])  # none, a frozen row, a trainable row
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_embedding_forward_equals_the_merged_one(padding_idx: int | None, dtype: Any) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, padding_idx=padding_idx)
    gg.train_only(emb, gg.rows("weight", [2, 6, 9]))
    x = torch.tensor([[6, 1, 9, 0], [2, 6, 6, 5]], dtype=dtype)
    x_t = x.t()  # a non-contiguous index too
    for inp in (x, x_t):
        fast, slow = emb(inp), _merged_forward(emb, inp)
        assert torch.equal(fast, slow)
        (g_fast,), (g_slow,) = _grads(emb, fast), _grads(emb, slow)
        assert torch.equal(g_fast, g_slow)
    if padding_idx == 6:  # the padding row is trainable: it gets no gradient, as on nn.Embedding
        (g,) = _grads(emb, emb(x))
        assert torch.equal(g[1], torch.zeros(4)) and g[0].abs().sum() > 0


@pytest.mark.parametrize(
    "options",
    [{"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"sparse": True}],
    ids=["max_norm", "scale_grad_by_freq", "sparse"],
)
def test_embedding_options_give_the_plain_module_s_values_and_gradients(
    options: dict[str, Any],
) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, **options)
    reference = copy.deepcopy(emb)
    gg.train_only(emb, gg.rows("weight", [2, 6]))
    x = torch.tensor([6, 6, 1, 2, 3])
    out, ref_out = emb(x), reference(x)
    assert torch.equal(out, ref_out)
    (g,) = _grads(emb, out)
    (ref_g,) = torch.autograd.grad(
        (ref_out * torch.linspace(-1, 1, ref_out.numel()).reshape(ref_out.shape)).sum(),
        [reference.weight],
    )
    ref_rows = ref_g.to_dense()[[2, 6]] if ref_g.is_sparse else ref_g[[2, 6]]
    assert g.is_sparse == bool(options.get("sparse"))  # sparse stays sparse, k rows
    assert torch.equal(g.to_dense() if g.is_sparse else g, ref_rows)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 6)], ids=["2d", "3d"])
def test_linear_forward_equals_the_merged_one(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 20, bias=bias)
    gg.freeze(lin, gg.rows("weight", slice(0, 17)))  # 3 of 20 rows train, the bias too
    x = torch.randn(*shape, requires_grad=True)
    fast, slow = lin(x), _merged_forward(lin, x)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6)
    for mine, ref in zip(_grads(lin, fast, x), _grads(lin, slow, x), strict=True):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)
    assert lin.get_submodule("weight_rows").base.grad is None  # W: no full-size gradient


def test_linear_with_many_trainable_rows_uses_the_merged_tensor() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 9)
    gg.train_only(lin, gg.rows("weight", [0, 1, 2]))  # a third of the rows: merged is cheaper
    x = torch.randn(4, 6)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


def test_linear_rows_of_weight_and_bias_together() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 20)
    reference = copy.deepcopy(lin)
    gg.train_only(lin, [gg.rows("weight", [18, 19]), gg.rows("bias", [18, 19])])
    x = torch.randn(4, 6)
    out = lin(x)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=1e-6)
    g_w, g_b = _grads(lin, out)
    ref_w, ref_b = torch.autograd.grad(
        (reference(x) * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum(),
        [reference.weight, reference.bias],
    )
    got = {tuple(g.shape): g for g in (g_w, g_b)}
    torch.testing.assert_close(got[(2, 6)], ref_w[18:], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[(2,)], ref_b[18:], rtol=0, atol=1e-6)


def test_half_precision_rows_on_the_fast_paths() -> None:
    torch.manual_seed(0)
    emb, lin = nn.Embedding(10, 4), nn.Linear(4, 10)
    gg.train_only(emb, gg.rows("weight", [8, 9]))
    gg.train_only(lin, gg.rows("weight", [8, 9]))
    emb.to(torch.bfloat16)
    lin.to(torch.bfloat16)
    x = torch.tensor([8, 1, 9])
    out = lin(emb(x))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out, _merged_forward(lin, _merged_forward(emb, x)), rtol=1e-2, atol=1e-2
    )
