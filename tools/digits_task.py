"""A real small task for the benchmarks: scikit-learn's handwritten digits (1,797 8×8 images, 10 classes, shipped
with the package), upsampled to the model's input, and models trained on it here so that fidelity and accuracy
after pruning mean something (a randomly initialised network's outputs carry no function to keep).

    from digits_task import digits, task_model_spec, train
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# Factories with a 10-class head: timm architectures from scratch, EfficientNet-Lite0 from its ImageNet weights.
_FACTORIES = """
import timm
from torch import nn

from edgeprune.zoo import efficientnet_lite0 as _lite0


def timm_model(name):
    return timm.create_model(name, num_classes=10)


def efficientnet_lite0():
    model = _lite0()
    model._fc = nn.Linear(model._fc.in_features, 10)
    return model
"""


def digits(side: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as N×3×side×side float32 (bilinear upsampling, normalised to mean 0, std 1), shuffled."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(x)))
    return x[order].contiguous(), torch.from_numpy(data.target.astype(np.int64))[order]


def task_model_spec(spec: str, folder: Path) -> str:
    """A model spec edgeprune can load for ``spec`` ("timm:NAME" or the bundled "edgeprune.zoo:efficientnet_lite0")
    with a 10-class head: a factory in ``folder``/task_models.py."""
    path = folder / "task_models.py"
    if not path.exists():
        path.write_text(_FACTORIES)
    source, _, name = spec.partition(":")
    if source == "timm":
        factory = f"timm_{name}"
        with path.open("a") as f:
            f.write(f"\n\ndef {factory}():\n    return timm_model({name!r})\n")
        return f"{path}:{factory}"
    if spec == "edgeprune.zoo:efficientnet_lite0":
        return f"{path}:efficientnet_lite0"
    raise ValueError(f"no digits head for {spec}")


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 3, batch: int = 64, lr: float = 2e-3):
    """Adam with a cosine schedule over ``epochs``; returns the model in eval mode."""
    torch.manual_seed(0)
    model.train()
    steps = epochs * ((len(x) + batch - 1) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            take = order[i : i + batch]
            loss = F.cross_entropy(model(x[take]), y[take])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((torch.cat([model(x[i : i + 128]) for i in range(0, len(x), 128)]).argmax(1) == y).float().mean())


def agreement(out: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Fidelity of outputs to the unpruned model's: top-1 agreement and mean cosine similarity."""
    top1 = float((out.argmax(1) == reference.argmax(1)).float().mean())
    return top1, float(torch.nn.functional.cosine_similarity(out, reference, dim=1).mean())


def trained_weights(name: str, side: int, folder: Path, epochs: int, spec: str, x, y, train_count: int = 1200) -> Path:
    """The weights of ``spec`` trained on the first ``train_count`` digits, kept in ``folder`` under the name
    bench_scorer.py gives them; trained there first when missing."""
    from edgeprune.model import load_model

    weights = folder / f"{name.replace(':', '_')}-{side}-e{epochs}.pt"
    if not weights.is_file():
        model = load_model(spec, input_shape=(1, 3, side, side)).module
        trained = train(model, x[:train_count], y[:train_count], epochs)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(trained.state_dict(), weights)
    return weights
