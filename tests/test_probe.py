"""Groups torch-pruning cannot prune safely are found, kept whole and named; --strict makes them an error."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from typer.testing import CliRunner

from edgeprune.cli import app
from edgeprune.score import probe
from edgeprune.score.allocate import uniform_plan
from edgeprune.score.importance import score_groups
from edgeprune.score.probe import find_unprunable

X = torch.zeros(1, 3, 16, 16)


class Hardcoded(nn.Module):
    """conv1's 32 channels are baked into a view: pruning conv1 breaks the forward; conv2 prunes cleanly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        b, _, h, w = x.shape
        x = x.view(b, 32, h * w).view(b, 32, h, w)
        return self.fc(torch.relu(self.conv3(torch.relu(self.conv2(x)))).mean((2, 3)))


def hardcoded() -> nn.Module:
    torch.manual_seed(0)
    return Hardcoded().eval()


def test_the_group_behind_a_hardcoded_reshape_is_found():
    model = hardcoded()
    scored = score_groups(model, X, "magnitude")
    found = find_unprunable(model, X, scored, multiple=8)
    assert set(found) == {"conv1"}
    assert "RuntimeError" in found["conv1"] and "\n" not in found["conv1"]
    # Kept whole, the rest of the model prunes and runs.
    kept = [g if g.module not in found else g.__class__(g.module, g.channels, None) for g in scored]
    plan = uniform_plan(kept, 0.5, 8, "m", tuple(X.shape), "magnitude")
    assert {g.module: g.width for g in plan.groups}["conv1"] == 32


def test_a_clean_model_costs_one_probe(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.LazyLinear(4))
    model(X)
    calls = []
    real = probe.apply_plan
    monkeypatch.setattr(probe, "apply_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert find_unprunable(model.eval(), X, score_groups(model, X, "magnitude"), multiple=8) == {}
    assert len(calls) == 1


def test_cli_keeps_them_whole_or_fails_with_strict(tmp_path, monkeypatch):
    here = str(Path(__file__).parent)
    (tmp_path / "net.py").write_text(f"import sys\nsys.path.insert(0, {here!r})\nfrom test_probe import hardcoded\n")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    args = ["build", "--model", "net.py:hardcoded", "--input-shape", "1,3,16,16", "--latency-ms", "1000"]
    strict = runner.invoke(app, [*args, "--strict", "--out", "a"])
    assert strict.exit_code == 2 and "--strict: 1 groups cannot be pruned safely (conv1)" in strict.stderr
    kept = runner.invoke(app, [*args, "--out", "b", "--json"])
    assert kept.exit_code == 0, kept.stderr
    assert '"module": "conv1"' in kept.stdout and "kept whole: conv1" in kept.stderr
