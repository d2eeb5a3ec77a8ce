"""What recovery distils on and when it stops: shifted copies of the task's images and its unlabelled images, and
no early stopping on a held-out split too small to judge (edgeprune/rewrite/recover.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny
from torch.nn import functional as F

from edgeprune.data import Dataset
from edgeprune.rewrite.recover import JUDGE_SAMPLES, distill, is_image_batch, recover, shifted
from edgeprune.score.allocate import uniform_plan
from edgeprune.score.importance import score_groups


def test_shifted_moves_the_whole_image_by_at_most_a_sixteenth_of_its_side():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    generator = torch.Generator().manual_seed(0)
    offsets = set()
    for _ in range(20):
        moved = shifted(x, generator)
        assert moved.shape == x.shape
        # The interior (2 pixels from each edge: 32 // 16) is the image moved by one offset within that reach.
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(moved[..., 2:-2, 2:-2], x[..., 2 + dy : 30 + dy, 2 + dx : 30 + dx])]  # fmt: skip
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 3  # random offsets, not one


def test_only_float_images_of_16_pixels_or_more_are_shifted():
    assert is_image_batch(torch.zeros(4, 3, 16, 16))
    assert not is_image_batch(torch.zeros(4, 3, 8, 8))  # too small to move by a pixel and stay the same image
    assert not is_image_batch(torch.zeros(4, 128, dtype=torch.long))  # token ids
    assert not is_image_batch(torch.zeros(4, 3, 16, 16, dtype=torch.long))


def _mismatch(student, teacher, x) -> float:
    with torch.no_grad():
        return float(F.mse_loss(student(x), teacher(x)))


@pytest.mark.slow
def test_distillation_learns_to_agree_on_the_unlabelled_images_it_is_given():
    teacher, base = tiny(seed=0), tiny(seed=1)
    generator = torch.Generator().manual_seed(3)
    task = [(torch.randn(4, 3, 16, 16, generator=generator), None)]
    # Images unlike the task batch (another brightness and contrast), where the two students can differ.
    unlabelled = [3 * torch.randn(8, 3, 16, 16, generator=generator) + 2 for _ in range(2)]
    without, given = copy.deepcopy(base), copy.deepcopy(base)
    distill(without, teacher, task, steps=40, lr=1e-2)
    distill(given, teacher, task, steps=40, lr=1e-2, unlabelled=unlabelled)
    images = torch.cat(unlabelled)
    assert _mismatch(given, teacher, images) < 0.7 * _mismatch(without, teacher, images)


def _data(n: int, seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset(x=torch.randn(n, 3, 16, 16, generator=generator), y=None, source="test", synthetic=False)


def test_recovery_runs_every_step_when_the_held_out_split_is_too_small_to_judge():
    model, example = tiny(seed=0), torch.zeros(1, 3, 16, 16)
    score_set = _data(32, 1)
    plan = uniform_plan(score_groups(model, example, "magnitude", []), 0.5, 4, "tiny", (1, 3, 16, 16), "magnitude")
    _, small = recover(model, plan, example, score_set, _data(24, 2), steps=30, compensating=False)
    assert small["distill_steps"] == 30 and small["early_stopping"].startswith(f"off: under {JUDGE_SAMPLES}")
    _, large = recover(model, plan, example, score_set, _data(JUDGE_SAMPLES, 2), steps=30, compensating=False)
    assert large["early_stopping"] == "on the held-out split"
