"""vote: a bank of earlier tasks' kept channels, the nearest tasks by embedding, and their votes as scores."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TinyDeeper

from edgeprune.errors import BadInput
from edgeprune.score.importance import ScoredGroup
from edgeprune.score.vote import load_entries, save_entry, task_embedding, vote_blocks, vote_scores

SHAPE = (1, 3, 16, 16)


def _plan(kept: list[int]) -> dict:
    return {"groups": [{"module": "pw", "channels": 8, "kept": kept}]}


def test_embedding_is_the_normalised_mean_of_the_penultimate_features():
    torch.manual_seed(0)
    model = TinyDeeper().eval()
    x = torch.randn(10, *SHAPE[1:])
    embedding = task_embedding(model, torch.zeros(SHAPE), [x[:6], x[6:]])
    assert embedding.shape == (16,) and float(embedding.norm()) == pytest.approx(1.0)
    captured = []
    handle = model.head.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    mean = captured[0].mean(0)
    assert torch.allclose(embedding, mean / mean.norm(), atol=1e-5)


def test_the_nearest_tasks_decide_which_channels_are_kept(tmp_path):
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    save_entry(tmp_path, "m", SHAPE, a, _plan([0, 1, 2, 3]), {"task": "a"})
    save_entry(tmp_path, "m", SHAPE, b, _plan([4, 5, 6, 7]), {"task": "b"})
    save_entry(tmp_path, "other-model", SHAPE, a, _plan([7]), {"task": "c"})
    (tmp_path / "broken.json").write_text("{not json")
    entries = load_entries(tmp_path, "m", SHAPE)
    assert sorted(e["info"]["task"] for e in entries) == ["a", "b"]  # other models and broken files are skipped
    own = [ScoredGroup("pw", 8, torch.arange(8, dtype=torch.float32))]  # magnitude would keep 4..7
    near_a = torch.tensor([0.9, 0.1]) / torch.tensor([0.9, 0.1]).norm()
    voted, used = vote_scores(own, entries, near_a, k=1)
    assert [u["task"] for u in used] == ["a"]
    assert set(voted[0].scores.topk(4).indices.tolist()) == {0, 1, 2, 3}
    voted, used = vote_scores(own, entries, near_a, k=2)  # both vote, a counts more
    assert used[0]["task"] == "a" and used[0]["similarity"] > used[1]["similarity"]
    assert set(voted[0].scores.topk(4).indices.tolist()) == {0, 1, 2, 3}
    with pytest.raises(BadInput, match="no earlier build"):
        vote_scores(own, [], near_a)


def test_bank_entries_are_whole_json_files(tmp_path):
    path = save_entry(tmp_path, "m", SHAPE, torch.tensor([1.0]), _plan([0]), {})
    assert json.loads(path.read_text())["kept"] == {"pw": [0]}
    assert not list(tmp_path.glob("*.tmp"))


def test_votes_keep_the_worth_of_each_group_when_the_scores_are_comparable(tmp_path):
    """With fisher's or taylor's scores (comparable across groups), a group whose channels matter ten times more to
    this task keeps ten times the score for the channels voted in, so global allocation still cuts it last; channels
    no neighbour kept are nearly free in both."""
    plan = {"groups": [{"module": m, "channels": 4, "kept": [0, 1]} for m in ("a", "b")]}
    save_entry(tmp_path, "m", SHAPE, torch.tensor([1.0]), plan, {})
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    own = [ScoredGroup("a", 4, base * 10, comparable=True), ScoredGroup("b", 4, base, comparable=True)]
    voted, _ = vote_scores(own, load_entries(tmp_path, "m", SHAPE), torch.tensor([1.0]))
    a, b = voted[0].scores, voted[1].scores
    assert voted[0].comparable and torch.allclose(a, b * 10)
    assert a[:2].min() > 20 * a[2:].max()  # voted in: the group's mean worth; voted out: the tie-break only


def test_the_blocks_at_least_half_the_nearest_weight_removed_are_voted_and_old_entries_abstain(tmp_path):
    """Entries record the blocks their plan removed; a vote removes those that the nearest tasks, weighted by
    similarity, removed at least half the time, the most removed first. Entries without a record (written before
    blocks were stored) abstain, and where none of the nearest records any, the vote is None (chosen on the task)."""

    def plan(dropped: list[str]) -> dict:
        return {"groups": [], "notes": {"dropped_blocks": dropped} if dropped else {}}

    near, far = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    save_entry(tmp_path, "m", SHAPE, near, plan(["b2", "b1"]), {"task": "a"})
    save_entry(tmp_path, "m", SHAPE, near * 0.9 + far * 0.1, plan(["b1", "b3"]), {"task": "b"})
    save_entry(tmp_path, "m", SHAPE, near * 0.8 + far * 0.2, plan([]), {"task": "c"})  # removed none
    save_entry(tmp_path, "m", SHAPE, far, plan(["b4", "b5"]), {"task": "d"})
    entries = load_entries(tmp_path, "m", SHAPE)
    assert {e["info"]["task"]: e["dropped"] for e in entries}["a"] == ["b2", "b1"]
    assert vote_blocks(entries, near, k=3) == ["b1"]  # 2 of 3 removed b1; b2 and b3 one each
    assert vote_blocks(entries, near, k=2) == ["b1", "b2"]  # b1 by both; b2 by a, the nearer: over half; not b3
    assert vote_blocks(entries, far, k=1) == ["b4", "b5"]
    for entry in entries:  # written before the thirty-first session: no record of blocks
        del entry["dropped"]
    assert vote_blocks(entries, near) is None
    next(e for e in entries if e["info"]["task"] == "a")["dropped"] = ["b2"]
    assert vote_blocks(entries, near, k=3) == ["b2"]  # only the entries that record blocks vote
    with pytest.raises(BadInput, match="no earlier build"):
        vote_blocks([], near)
