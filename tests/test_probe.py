"""Groups torch-pruning cannot prune safely are found, kept whole and named; --strict makes them an error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from edgeprune.cli import app
from edgeprune.score.allocate import uniform_plan
from edgeprune.score.importance import score_groups
from edgeprune.search import probe
from edgeprune.search.probe import find_unprunable

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


@pytest.mark.slow
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
    # A budget no cut reaches says how much of the model had to be kept whole, and why: the usual cause.
    args[-1] = "0.00001"
    far = runner.invoke(app, [*args, "--out", "c", "--max-rounds", "1"])
    assert far.exit_code == 1 and "1 of 3 groups cannot be pruned safely and are kept whole (RuntimeError" in far.stderr


class ThreeWay(nn.Module):
    """conv1's channels are viewed as 3 equal parts: prunes cleanly to 24 of 48 (half), fails at 32 (a third off)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 48, 3, padding=1)
        self.conv2 = nn.Conv2d(48, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        b, c, h, w = y.shape
        y = y.view(b, 3, c // 3, h, w).reshape(b, c, h, w)  # c // 3 * 3 != c unless c is a multiple of 3
        return self.fc(torch.relu(self.conv2(y)).mean((2, 3)))


def test_the_loop_probes_again_at_a_ratio_that_fails(tmp_path):
    from dataclasses import replace as dc_replace

    from edgeprune.loop import SearchContext
    from edgeprune.target import load_target

    torch.manual_seed(0)
    model = ThreeWay().eval()
    assert find_unprunable(model, X, score_groups(model, X, "magnitude"), multiple=8) == {}  # fine at half width
    target = dc_replace(load_target("x86-openvino"), channel_multiple=8)
    said: list[str] = []
    ctx = SearchContext(model, X, score_groups(model, X, "magnitude"), "m", "magnitude", target, None, None, tmp_path,
                        said.append)  # fmt: skip
    plan, macs, _ = ctx.plan_at(0.33)  # 48 → 32 channels: 32 is not a multiple of 3
    assert set(ctx.unprunable) == {"conv1"} and any("more groups cannot be pruned safely" in m for m in said)
    assert {g.module: g.width for g in plan.groups}["conv1"] == 48
    assert {g.module: g.width for g in ctx.plan_at(0.5)[0].groups}["conv1"] == 48  # later plans keep it whole


@pytest.mark.slow
def test_an_internal_error_is_one_line_exit_3(tmp_path, monkeypatch):
    import edgeprune.pipeline as build_module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(build_module, "score_groups", broken)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["build", "--model", "timm:mobilenetv3_small_100", "--input-shape", "1,3,64,64"])
    # score_groups failing is reported as a model torch-pruning cannot follow (bad input), not a traceback
    assert result.exit_code == 2 and "ZeroDivisionError: a bug" in result.stderr and "Traceback" not in result.stderr
    import edgeprune.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "load_dataset", broken)
    result = CliRunner().invoke(app, ["build", "--model", "timm:mobilenetv3_small_100", "--input-shape", "1,3,64,64"])
    assert result.exit_code == 3 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("edgeprune: internal error: ZeroDivisionError: a bug")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_groups_torch_pruning_cannot_score_are_kept_whole_with_the_reason():
    """Res2Net's split-and-concat trips torch-pruning's index mapping inside some groups' importance."""
    from edgeprune.model import load_model

    torch.manual_seed(0)
    model = load_model("timm:res2net50_14w_8s", input_shape=(1, 3, 64, 64)).module
    scored = score_groups(model, torch.zeros(1, 3, 64, 64), "magnitude")
    failed = [g for g in scored if g.reason]
    assert failed and all(g.scores is None and g.reason.startswith("torch-pruning") for g in failed)
    modules = dict(model.named_modules())
    assert all(g.channels == modules[g.module].out_channels for g in scored)  # true widths, not the mapped indices
    assert any(g.scores is not None for g in scored)  # the rest is scored as usual
    plan = uniform_plan(scored, 0.5, 8, "m", (1, 3, 64, 64), "magnitude")
    widths = {g.module: (g.channels, g.width) for g in plan.groups}
    assert all(widths[g.module][0] == widths[g.module][1] for g in failed)


class SplitConcat(nn.Module):
    """Res2Net's pattern: a conv's output split into fixed-width chunks, each convolved, concatenated back."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 32, 1)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.conv3 = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        chunks = torch.split(torch.relu(self.conv1(x)), 8, 1)
        parts, branch = [], None
        for i, conv in enumerate(self.convs):
            branch = torch.relu(conv(chunks[i] if branch is None else branch + chunks[i]))
            parts.append(branch)
        return self.fc((self.conv3(torch.cat([*parts, chunks[3]], 1)) + x).mean((2, 3)))


def test_a_group_torch_pruning_maps_wrongly_is_kept_whole_with_its_true_width():
    torch.manual_seed(0)
    model = SplitConcat().eval()
    scored = {g.module: g for g in score_groups(model, X, "magnitude")}
    # torch-pruning maps 72 indices onto conv1's 32 channels; the group records the real 32, unscored, with why.
    assert scored["conv1"].channels == 32 and scored["conv1"].scores is None
    assert "cannot follow this group" in scored["conv1"].reason and "more indices than" in scored["conv1"].reason
    found = find_unprunable(model, X, list(scored.values()), multiple=4)
    plan = uniform_plan([g for g in scored.values() if g.module not in found], 0.5, 4, "m", tuple(X.shape), "m")
    pruned = probe.apply_plan(model, plan, X)
    assert pruned.conv1.out_channels == 32 and pruned(X).shape == (1, 10)


def test_a_rewrite_that_feeds_the_wrong_channels_is_told_apart():
    """The check behind the probe (rewrite/verify.py): the pruned model must compute what the unpruned one does
    with its cut channels silenced. A correct cut passes to float precision; the same widths with the next layer
    reading the wrong inputs (what torch-pruning did to SKNet's path attention and to swapped split slices) run
    and export, and fail it. On skresnet18 the probe keeps its 8 path-attention groups whole for this reason."""
    from edgeprune.graph.plan import GroupPlan, Plan
    from edgeprune.rewrite.verify import check_routing

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3),
                          nn.Flatten(), nn.LazyLinear(4))  # fmt: skip
    model(X)
    model.eval()
    kept = {"0": tuple(range(4, 16))}
    plan = Plan("m", tuple(X.shape), "manual", 0.25, tuple(
        GroupPlan(g.module, g.channels, kept.get(g.module, tuple(range(g.channels))))
        for g in score_groups(model, X, "magnitude")))  # fmt: skip
    pruned = probe.apply_plan(model, plan, X)
    right = check_routing(model, plan, pruned, X)
    assert right.checked and right.ok and right.error < 1e-5
    with torch.no_grad():
        pruned[3].weight.copy_(model[3].weight[:, :12])  # same widths, but reading channels 0-11, not 4-15
    wrong = check_routing(model, plan, pruned, X)
    assert wrong.checked and not wrong.ok and wrong.error > 1e-3
    # A build's example image is all zeros, on which every channel of this untrained stem is zero and any routing
    # looks right; the check draws its own input (skresnet18's wrong routing passed a zeros-only check).
    assert not check_routing(model, plan, pruned, torch.zeros_like(X)).ok
    normed = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16), nn.Conv2d(16, 8, 3)).eval()
    plan = uniform_plan(score_groups(normed, X, "magnitude"), 0.5, 4, "m", tuple(X.shape), "magnitude")
    unchecked = check_routing(normed, plan, probe.apply_plan(normed, plan, X), X)
    assert not unchecked.checked and unchecked.ok and "GroupNorm" in unchecked.reason
