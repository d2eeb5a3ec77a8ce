"""Limited task data, end to end: a pretrained model adapted to a 10-class task with a new head, pruned with
least-squares compensation into a mask bank, then a second, similar task pruned by votes from that bank."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_CNN, run_build, write_digits

sklearn = pytest.importorskip("sklearn", reason="scikit-learn ships the digits")


def _build(tmp_path, name: str, *args: str) -> dict:
    # the tiny cnn has 100 classes: the task's 10 need a head
    done = run_build("--model", TINY_CNN, "--macs-ratio", "0.7", "--out", str(tmp_path / name), "--json",
                     "--adapt-steps", "20", "--recover-steps", "5", *args)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_adapt_compensate_into_a_bank_then_vote(tmp_path):
    write_digits(tmp_path / "task_a.npz", range(10), per_class=30)
    write_digits(tmp_path / "unlabelled.npz", range(10), per_class=4, skip=30, labelled=False)
    write_digits(tmp_path / "task_b.npz", range(10), per_class=8)
    bank = tmp_path / "bank"
    first = _build(tmp_path, "a", "--train", str(tmp_path / "task_a.npz"), "--calib", str(tmp_path / "unlabelled.npz"),
                   "--method", "compensate", "--bank", str(bank))  # fmt: skip
    # Every one of the 300 labelled samples is read (images from --calib stop at 256), and the refit fits on the
    # 225 that are not held out plus the 40 unlabelled images.
    assert first["data"]["samples"] == 300 and first["quality"]["compensated_on"] == "265 samples"
    # A new 10-class head on the 100-class model, fine-tuned with held-out early stopping.
    assert first["adapted"]["classes"] == 10 and first["adapted"]["steps"] >= 1
    assert first["quality"]["metric"] == "accuracy"
    assert "least-squares compensation" in first["quality"]["recovery"] and first["quality"]["distill_steps"] == 0
    assert first["quality"]["compensated_layers"] > 0
    # Global allocation's steepness was chosen on the task's own data, by the outputs of every steepness's plan, each
    # with its channels chosen by taylor's scores, by weight magnitude, L2 and L1, and by energy.
    steepness = first["steepness"]
    assert steepness["chosen"] in (0, 1, 2, 4, "uniform") and steepness["samples"] > 0
    assert steepness["channels"] in ("importance", "l2", "l1", "energy")
    assert all(d is None or d >= 0 for d in steepness["distance"].values()) and len(steepness["distance"]) == 20
    assert {"uniform", "uniform l2", "uniform l1", "uniform energy"} <= set(steepness["distance"])
    assert len(list(bank.glob("*.json"))) == 1 and first["bank_entry"].startswith(str(bank))
    second = _build(tmp_path, "b", "--train", str(tmp_path / "task_b.npz"), "--method", "vote", "--bank", str(bank))
    neighbours = second["vote"]["neighbours"]
    assert len(neighbours) == 1 and neighbours[0]["method"] == "compensate" and neighbours[0]["similarity"] > 0.8
    assert second["met_budget"] and second["result"]["macs_ratio"] <= 0.7
    # vote keeps the channels the earlier tasks kept: no choice by magnitude is offered
    assert second["steepness"]["channels"] == "importance" and len(second["steepness"]["distance"]) in (0, 5)
    assert len(list(bank.glob("*.json"))) == 2  # the vote build is in the bank too
