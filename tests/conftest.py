"""Models, helpers and fixtures shared by the tests: the stage 2 and stage 3 models, the tiny models built in code,
the digits task, a build in a subprocess, and the private cache and quick benchmark settings every test runs with."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from sshd import make_server
from torch import nn
from torch.nn import functional as F

from edgeprune.graph.plan import Plan
from edgeprune.model import load_model
from edgeprune.rewrite.prune import apply_plan
from edgeprune.score.allocate import uniform_plan
from edgeprune.score.importance import score_groups

# OpenVINO's converter sends a usage event by forking the calling process (about 0.5 s of a candidate's export
# here), unless consent was declined or CI is "true", as CI runners set it. The tests send nothing, from any machine.
os.environ["CI"] = "true"

SHAPE = (1, 3, 64, 64)
R18 = "timm:resnet18"
MBV3 = "timm:mobilenetv3_small_100"
ROOT = Path(__file__).resolve().parents[1]
TINY_MODELS = Path(__file__).parent / "data" / "tiny_models.py"
TINY_CNN = f"{TINY_MODELS}:cnn"  # a model spec: a few seconds per build instead of a minute


def load_script(path: Path) -> ModuleType:
    """A Python file outside the package imported by its path (tests/data/tiny_models.py, calibration/*.py)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model(name: str, seed: int = 0) -> nn.Module:
    """A model of tests/data/tiny_models.py, in eval mode, its random weights fixed by ``seed``."""
    module = load_script(TINY_MODELS)
    torch.manual_seed(seed)
    return getattr(module, name)().eval()


def make_sample() -> ModuleType:
    """calibration/make_sample.py, which writes the sample image folder."""
    return load_script(ROOT / "calibration" / "make_sample.py")


def write_digits(path: Path, classes: range = range(10), side: int = 32, per_class: int = 20, skip: int = 0,
                 labelled: bool = True) -> None:  # fmt: skip
    """An .npz task of scikit-learn's 8x8 digits, ``per_class`` of each class from the ``skip``-th, scaled up to
    ``side`` pixels in three channels and normalised to [-1, 1] (the tiny models' mean and std of 0.5)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    chosen = np.concatenate([np.flatnonzero(data.target == c)[skip : skip + per_class] for c in classes])
    images = data.images[chosen].astype(np.float32) / 16.0
    x = np.repeat(np.kron(images, np.ones((side // 8, side // 8), np.float32))[:, None], 3, axis=1)
    labels = {"y": data.target[chosen].astype(np.int64)} if labelled else {}
    np.savez(path, x=(x - 0.5) / 0.5, **labels)


def run_build(*args: str, timeout: int = 400, env: dict | None = None) -> subprocess.CompletedProcess:
    """``edgeprune build ARGS`` in a subprocess, with Python's warnings off so that stderr holds what the build says."""
    command = [sys.executable, "-m", "edgeprune.cli", "build", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ if env is None else env, PYTHONWARNINGS="ignore"))  # fmt: skip


class Tiny(nn.Module):
    """A stem, an inverted-residual block (pointwise, depthwise, pointwise) with a residual add, and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 32, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.pwl = nn.Conv2d(32, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.pw(x)))
        y = F.relu(self.bn2(self.dw(y)))
        x = x + self.bn3(self.pwl(y))
        return self.head(x.mean((2, 3)))


class TinyDeeper(Tiny):
    """Tiny with a second inverted-residual block: the same module names as Tiny, and one more group."""

    def __init__(self) -> None:
        super().__init__()
        self.pw2 = nn.Conv2d(16, 24, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(24)
        self.dw2 = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False)
        self.bn5 = nn.BatchNorm2d(24)
        self.pwl2 = nn.Conv2d(24, 16, 1, bias=False)
        self.bn6 = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.pw(x)))
        x = x + self.bn3(self.pwl(F.relu(self.bn2(self.dw(y)))))
        y = F.relu(self.bn4(self.pw2(x)))
        x = x + self.bn6(self.pwl2(F.relu(self.bn5(self.dw2(y)))))
        return self.head(x.mean((2, 3)))


def randomise_norms(model: nn.Module) -> nn.Module:
    """Random BN affine parameters and statistics, as a trained model has them, and eval mode.

    timm initialises the last BN of every residual block with weight 0, which makes every gradient inside the block,
    and so its Taylor scores, zero; trained weights never look like that.
    """
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return randomise_norms(Tiny())


def load_seeded(spec: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # timm builds with random weights: a seed makes two loads of one spec the same model
    return randomise_norms(load_model(spec, input_shape=SHAPE).module)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def r18() -> nn.Module:
    return load_seeded(R18)


@pytest.fixture(scope="module")
def mbv3() -> nn.Module:
    return load_seeded(MBV3)


@pytest.fixture(scope="module")
def example() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def r18_scored(r18, example):
    return score_groups(r18, example, "magnitude")


@pytest.fixture(scope="module")
def mbv3_scored(mbv3, example):
    return score_groups(mbv3, example, "magnitude")


@pytest.fixture(scope="module")
def r18_plan(r18_scored) -> Plan:
    return uniform_plan(r18_scored, 0.5, 8, R18, SHAPE, "magnitude")


@pytest.fixture(scope="module")
def r18_pruned(r18, r18_plan, example) -> nn.Module:
    return apply_plan(r18, r18_plan, example)


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory) -> None:
    """Builds cache their latency measurements; in tests, in a folder of the session, never the user's cache."""
    os.environ["EDGEPRUNE_CACHE"] = str(tmp_path_factory.mktemp("edgeprune-cache"))


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache of the test's own (``tmp_path / "cache"``), for tests about what is cached or measured anew."""
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# The benchmark settings most tests build with: one short window. The tests about what a build does (the report,
# the files, interrupts, bad input) do not depend on a precise latency, and the bundled profiles' three windows of at
# least 0.5 s made each benchmark take 3-4 s even for a tiny model, most of the suite's time. The tests that judge a
# measured speedup build in a subprocess whose environment `without_quick_profiles` gives the bundled settings.
QUICK_BENCHMARK = {"windows": 1, "min_timed_s": 0.1, "min_warmup_s": 0.1}


@pytest.fixture(autouse=True, scope="session")
def _quick_profiles(tmp_path_factory) -> None:
    """Copies of the bundled profiles with QUICK_BENCHMARK, which names look up first ($EDGEPRUNE_TARGETS)."""
    from edgeprune.target import PROFILES_ENV, targets_dir

    folder = tmp_path_factory.mktemp("quick-profiles")
    settings = "".join(f"{key} = {value}\n" for key, value in QUICK_BENCHMARK.items())
    for bundled in targets_dir().glob("*.toml"):
        text = bundled.read_text()
        text = text.replace("[benchmark]\n", f"[benchmark]\n{settings}") if "[benchmark]\n" in text else (
            f"{text}\n[benchmark]\n{settings}")  # fmt: skip
        (folder / bundled.name).write_text(text)
    os.environ[PROFILES_ENV] = str(folder)


def without_quick_profiles(env: dict) -> dict:
    """``env`` for a build whose measured latency is what the test judges: the bundled benchmark settings."""
    from edgeprune.target import PROFILES_ENV

    return {key: value for key, value in env.items() if key != PROFILES_ENV}


def pytest_collection_modifyitems(items: list) -> None:
    """Run the tests that convert with litert-torch in this process last: it imports JAX, whose threads make any
    later os.fork() in the test process (multiprocessing in libraries the earlier tests use) unsafe."""
    uses_litert = [item for item in items if "litert" in item.nodeid]
    items[:] = [item for item in items if item not in uses_litert] + uses_litert


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real sshd on 127.0.0.1 (tests/sshd.py) for the tests of one module, stopped after them."""
    server = make_server(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()
