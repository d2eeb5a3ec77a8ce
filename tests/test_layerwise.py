"""Stage 2's per-layer latency model: OpenVINO's per-node times, their attribution to layers, and the fit on them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import MBV3  # noqa: F401

from edgeprune.backends import get_backend
from edgeprune.score.allocate import global_widths, uniform_plan
from edgeprune.score.costmodel import new_model
from edgeprune.score.layerwise import _line_fits, attribute, fit_layerwise
from edgeprune.score.structure import read_structure
from edgeprune.target import load_target

TARGET = load_target("x86-openvino")


pytestmark = pytest.mark.usefixtures("private_cache")  # each test measures and caches afresh


def test_node_names_are_attributed_to_the_layer_whose_scope_they_carry():
    # Names as OpenVINO 2025's CPU plugin reported them for timm's mobilenetv3_large_100.
    layers = ["conv_stem", "blocks.5.0.conv_pw", "blocks.5.1.se.conv_reduce", "classifier", "stages.0.blocks.0.mlp.fc1"]
    nodes = [
        ("input_abcd_acdb_/conv_stem/Conv/WithoutBiases", "Reorder", 0.1),  # a layout change: the rest
        ("/conv_stem/Conv/WithoutBiases", "Convolution", 0.05),
        ("/blocks/blocks.5/blocks.5.0/conv_pw/Conv/WithoutBiases", "Convolution", 0.03),
        ("/blocks/blocks.5/blocks.5.1/se/conv_reduce/Conv/WithoutBiases", "Convolution", 0.02),
        ("/blocks/blocks.5/blocks.5.1/se/ReduceMean", "ReduceMean", 0.04),  # no conv or linear layer: the rest
        ("/classifier/Gemm/WithoutBiases", "FullyConnected", 0.01),
        ("Multiply_n45", "Subgraph", 0.005),
        # and for timm's convnext_atto: a container's index inside a stage's own container
        ("/stages/stages.0/blocks/blocks.0/mlp/fc1/MatMul", "FullyConnected", 0.07),
        ("/stages/stages.0/blocks/blocks.0/norm/LayerNormalization", "MVN", 0.06),
    ]
    found = attribute(nodes, layers)
    assert found.own == pytest.approx([0.05, 0.03, 0.02, 0.01, 0.07]) and found.rest == pytest.approx(0.205)
    assert found.after == [0.0] * 5  # no graph edges given: nothing can be placed after a layer


def test_nodes_without_a_layer_belong_to_the_layer_whose_output_they_work_on():
    """Names and edges as OpenVINO 2025's CPU plugin reported them for timm's convnext_atto: the reorders around a
    decomposed LayerNorm carry no module scope; walking their inputs back finds the depthwise conv they follow."""
    layers = ["stem.0", "stages.0.blocks.0.conv_dw", "stages.0.blocks.0.mlp.fc1"]
    dw = "/stages/stages.0/blocks/blocks.0/conv_dw/Conv/WithoutBiases"
    nodes = [
        ("input_abcd_acdb_/stem/stem.0/Conv/WithoutBiases", "Reorder", 0.14, ("input",)),  # reads the model input
        ("/stem/stem.0/Conv/WithoutBiases", "Convolution", 0.5, ("input_abcd_acdb_/stem/stem.0/Conv/WithoutBiases",)),
        (dw, "Convolution", 0.3, ("/stem/stem.0/Conv/WithoutBiases",)),
        ("Subtract_77414", "Eltwise", 0.02, (dw,)),
        ("Subtract_77414_acdb_abcd_MVN_n14", "Reorder", 0.05, ("Subtract_77414",)),
        ("MVN_n14", "MVN", 0.04, ("Subtract_77414_acdb_abcd_MVN_n14", "Subtract_77414")),
        ("/stages/stages.0/blocks/blocks.0/mlp/fc1/MatMul", "FullyConnected", 0.2, ("MVN_n14",)),
        ("Multiply_n45", "Subgraph", 0.01, ("/stages/stages.0/blocks/blocks.0/mlp/fc1/MatMul",)),
    ]
    found = attribute(nodes, layers)
    assert found.own == pytest.approx([0.5, 0.3, 0.2])
    assert found.after == pytest.approx([0.0, 0.11, 0.01]) and found.rest == pytest.approx(0.14)


def test_a_renamed_runtime_is_not_priced_by_the_one_layer_it_kept_a_name_for():
    """A chain deeper than Python's recursion of convs whose names no layer matches, after one named stem: they and
    the nodes after them stay in the rest (a conv is work of its own), and the per-layer fit declines to judge."""
    nodes = [("/stem/Conv", "Convolution", 0.1, ("input",))]
    for i in range(3000):
        nodes.append((f"conv_{i}", "Convolution", 0.01, (nodes[-1][0],)))
        nodes.append((f"relu_{i}", "Eltwise", 0.001, (nodes[-1][0],)))
    nodes.append(("Multiply_n1", "Eltwise", 0.002, ("/stem/Conv",)))
    found = attribute(list(reversed(nodes)), ["stem"])
    assert found.own == pytest.approx([0.1]) and found.after == pytest.approx([0.002])
    assert found.rest == pytest.approx(3000 * 0.011)
    samples = np.ones((2, 1))
    assert fit_layerwise(samples, samples * 0.1, np.ones(2), np.full(2, 33.0), samples * 0.002, samples) is None


def test_line_fits_recover_each_column_and_never_go_negative():
    x = np.array([[1.0, 1.0, 2.0], [2.0, 2.0, 2.0], [3.0, 3.0, 2.0]])
    y = np.array([[1.5, 3.0, 4.0], [2.5, 2.0, 4.0], [3.5, 1.0, 4.0]])
    intercept, slope = _line_fits(x, y)
    assert intercept[0] == pytest.approx(0.5) and slope[0] == pytest.approx(1.0)
    # Time that falls as work grows (noise) gets no negative slope; a column that never varied scales through 0.
    assert slope[1] == 0.0 and intercept[1] == pytest.approx(2.0)
    assert intercept[2] == 0.0 and slope[2] == pytest.approx(2.0)
    # From one sample: each layer's time scaled by its own work.
    intercept, slope = _line_fits(x[:1], y[:1])
    assert (intercept == 0).all() and slope == pytest.approx([1.5, 3.0, 2.0])


def test_per_layer_fit_prices_layers_that_one_cost_per_mac_cannot(mbv3, mbv3_scored, example):
    """A runtime on which each layer has its own efficiency, and depthwise layers are slow per MAC: the per-layer
    fit on node times predicts new plans within 2%, where the roofline scaled to the same totals misses. Each
    sample's node times are counted in a busy spell that slows them all alike, as the unpruned model counted
    alongside shows: divided out."""
    structure = read_structure(mbv3, example, [g.module for g in mbv3_scored])
    model = new_model(structure, TARGET, "openvino 1.0")
    rng = np.random.default_rng(0)
    efficiency = rng.uniform(0.5, 3.0, len(structure.layers)) * np.where(structure.kind_mask("depthwise"), 8, 1)

    def node_sum(widths):
        roofline, activations, _ = model.layer_terms(widths)
        return 0.002 + efficiency * roofline, 0.05 + 2e-7 * activations

    def runtime(widths, busy=1.0):  # node times, the reference's, and the p50 as a timer outside the counters sees it
        per_layer, rest = node_sum(widths)
        nodes = [(f"/{'/'.join(layer.name.split('.'))}/Conv", "Convolution", float(busy * ms))
                 for layer, ms in zip(structure.layers, per_layer, strict=True)]  # fmt: skip
        reference = busy * sum(node_sum(structure.full_widths())[0]) + busy * node_sum(structure.full_widths())[1]
        return nodes + [("Reorder_n1", "Reorder", busy * rest)], reference, 0.3 + 1.1 * (per_layer.sum() + rest)

    def random_widths():
        return np.maximum(8, np.round(structure.channels * rng.uniform(0.3, 1.0, len(structure.channels)) / 8) * 8)

    samples = [structure.full_widths()] + [random_widths() for _ in range(7)]
    for i, widths in enumerate(samples):
        nodes, reference, p50 = runtime(widths, busy=1.0 if i == 0 else rng.uniform(1.0, 2.0))
        model.add_nodes(widths, nodes, None if i == 0 else reference)  # the unpruned model: its own reference
        model.add(widths, p50)
    assert model.layerwise is not None and "per-layer fit to 8 per-node profiles" in model.source
    scaled = new_model(structure, TARGET, "openvino 1.0")
    for widths in samples:
        scaled.add(widths, runtime(widths)[2])
    scaled.use_scaled_roofline()
    errors, scaled_errors = [], []
    for _ in range(6):
        widths = random_widths()
        truth = runtime(widths)[2]
        errors.append(abs(model.predict(widths) - truth) / truth)
        scaled_errors.append(abs(scaled.predict(widths) - truth) / truth)
    assert max(errors) < 0.02 and max(scaled_errors) > 0.05
    # The node samples are cached with the p50s: the next build starts from the same per-layer fit.
    from edgeprune.score.costmodel import profile_path

    model.save(profile_path(TARGET, "openvino 1.0", structure), "openvino 1.0")
    again = new_model(structure, TARGET, "openvino 1.0")
    assert again.layerwise is not None and again.predict(widths) == pytest.approx(model.predict(widths))


@pytest.mark.slow
def test_openvino_reports_node_times_that_fall_to_the_models_layers(mbv3, mbv3_scored, example, tmp_path):
    backend = get_backend("openvino")
    structure = read_structure(mbv3, example, [g.module for g in mbv3_scored])
    artifact = backend.export(mbv3, example, tmp_path, TARGET)
    nodes, reference = backend.node_times(artifact, tuple(example.shape), TARGET, runs=10)
    found = attribute(nodes, [layer.name for layer in structure.layers])
    per_layer, rest = found.own, sum(found.after) + found.rest
    assert reference is None
    assert all(ms >= 0 for _, _, ms, _ in nodes) and sum(per_layer) > 0
    # The runtime's own graph places every other node (activations, squeeze-excite pooling, reorders) after a layer,
    # but the reorder of the model's input and the classifier, which OpenVINO renames after the model's output.
    ends = sum(ms for name, _, ms, _ in nodes if name.startswith("input_") or name == "output")
    assert found.rest <= ends + 1e-9 and sum(found.after) > 0
    # Nearly every conv and linear layer is found by name, and most of the time is theirs.
    found = sum(ms > 0 for ms in per_layer)
    assert found >= 0.9 * len(structure.layers), (found, len(structure.layers))
    assert sum(per_layer) > rest
    # A halved model moves time off its layers: the counters see widths.
    half = uniform_plan(mbv3_scored, 0.5, 8, MBV3, tuple(example.shape), "m")
    from edgeprune.rewrite.prune import apply_plan

    (tmp_path / "half").mkdir()
    small = backend.export(apply_plan(mbv3, half, example), example, tmp_path / "half", TARGET)
    # Counted beside the unpruned model, whose summed node time comes back with them.
    half_nodes, reference = backend.node_times(small, tuple(example.shape), TARGET, reference=artifact, runs=20)
    half = attribute(half_nodes, [layer.name for layer in structure.layers])
    half_layers, half_rest = half.own, sum(half.after) + half.rest
    assert reference > sum(half_layers) + half_rest
    assert sum(half_layers) / reference < sum(per_layer) / (sum(per_layer) + rest)


def test_runtimes_without_node_counters_say_so(mbv3, example, tmp_path):
    assert get_backend("tflite").node_times(None, tuple(example.shape), TARGET) is None  # never reaches a runner
    from edgeprune.device import LocalDevice
    from edgeprune.errors import EdgepruneError

    onnx = get_backend("onnx")
    artifact = onnx.export(mbv3, example, tmp_path, TARGET)
    assert onnx.node_times(artifact, tuple(example.shape), TARGET) is None
    with pytest.raises(EdgepruneError, match="--node-times needs OpenVINO's per-node counters"):
        LocalDevice().run_runner(["--runtime", "onnxruntime", "--model", str(artifact.model), "--shape", "1,3,8,8",
                                  "--node-times", "5"])  # fmt: skip


@pytest.mark.slow
def test_a_speedup_build_on_an_empty_cache_prices_its_rounds_layer_by_layer(tmp_path):
    """No profile, no earlier build: the unpruned baseline's per-node times are taken, for a speedup budget as for
    one in ms, and the rounds are priced by the per-layer fit (a bug once skipped them for speedup budgets)."""
    import json

    from edgeprune import build
    from edgeprune.errors import EdgepruneError
    from edgeprune.pipeline import BuildOptions
    from edgeprune.target import Budget

    options = BuildOptions(model="timm:resnet18", input_shape=(1, 3, 64, 64), budget=Budget(speedup=1.2),
                           out=tmp_path / "out", recover_steps=0, max_rounds=1)  # fmt: skip
    try:
        report = build(options, say=lambda message: None)
    except EdgepruneError as exc:  # one round may miss the budget on a busy machine: the cache still holds it
        report = exc.report
    cached = json.loads(next((tmp_path / "cache" / "profiles").rglob("*.json")).read_text())
    # The unpruned model's, with its own sum; and the round's, if it measured more than 10% off its prediction.
    assert 1 <= len(cached["node_samples"]) <= 2 and cached["node_samples"][0][4] > 0
    assert len(cached["samples"]) >= 2  # the baseline and the round
    if report is not None:
        fitted = f"per-layer fit to {len(cached['node_samples'])} per-node profiles"
        assert fitted in report["cost_model"]["after_build"]


@pytest.mark.slow
def test_a_width_the_runtime_lays_out_badly_is_priced_and_stepped_over(r18, r18_scored, example):
    """A runtime that reorders one group's stream at one width (as OpenVINO does ConvNeXt's at 32 channels): the
    nodes after its layers cost more there than at the widths on either side. The fit tabulates them by width and
    predicts the jump; global allocation, cutting that cheap group, steps over the slow width instead of landing on
    it or stopping above it."""
    structure = read_structure(r18, example, [g.module for g in r18_scored])
    model = new_model(structure, TARGET, "openvino 1.0")
    full = structure.full_widths()
    g = next(i for i, s in enumerate(r18_scored) if s.scores is not None and s.channels == 64)
    bad = 48

    def with_group(widths, width):
        widths = widths.copy()
        widths[g] = width
        return widths

    follows = model.layer_terms(with_group(full, 32))[2] != model.layer_terms(full)[2]  # the layers g's width sets
    names = [f"/{'/'.join(layer.name.split('.'))}/Conv" for layer in structure.layers]

    def runtime(widths):
        roofline, _, outs = model.layer_terms(widths)
        positions = np.array([layer.out_positions for layer in structure.layers])
        after = 2e-6 * outs * positions + 0.3 * follows * (widths[g] == bad)
        nodes = [
            (name, "Convolution", 0.001 + 2 * float(r), ("input",)) for name, r in zip(names, roofline, strict=True)
        ]
        nodes += [(f"Eltwise_{j}", "Eltwise", float(ms), (names[j],)) for j, ms in enumerate(after)]
        return nodes, 0.2 + sum(ms for _, _, ms, _ in nodes)

    rng = np.random.default_rng(0)
    samples = [full] + [with_group(full, w) for w in (56, bad, 40)]
    samples += [
        np.maximum(8, np.round(structure.channels * rng.uniform(0.5, 1.0, len(full)) / 8) * 8) for _ in range(6)
    ]
    for widths in samples:
        nodes, p50 = runtime(widths)
        model.add_nodes(widths, nodes, 1.0)
        model.add(widths, p50)
    for width in (56, bad, 40):
        widths = np.maximum(8, np.round(structure.channels * 0.75 / 8) * 8)
        widths = with_group(widths, width)
        assert model.predict(widths) == pytest.approx(runtime(widths)[1], rel=0.02)
    assert (
        model.predict(with_group(full, bad)) > model.predict(with_group(full, 56)) > model.predict(with_group(full, 40))
    )
    cheap = [replace(s, scores=s.scores * (1e-3 if i == g else 1.0), comparable=True) if s.scores is not None else s
             for i, s in enumerate(r18_scored)]  # fmt: skip
    widths = global_widths(cheap, structure, model.predict, 0.9 * model.predict(full), 8)
    assert widths[g] < bad and model.predict(widths) <= 0.9 * model.predict(full)


@pytest.mark.slow
def test_a_mispriced_round_teaches_the_cost_model_where_its_time_went(r18, r18_scored, example, tmp_path):
    """The loop takes the per-node times of a round that measured far off its prediction (loop.MISPRICED): counted
    beside the unpruned model, added to the per-layer fit with what follows each layer. A runtime that cannot give
    them is said once and not asked again."""
    from edgeprune.device import LocalDevice
    from edgeprune.loop import SearchContext, learn_where_time_goes
    from edgeprune.rewrite.prune import apply_plan

    backend = get_backend("openvino")
    said: list[str] = []
    ctx = SearchContext(r18, example, r18_scored, "m", "magnitude", TARGET, backend, None, tmp_path, said.append)
    ctx.structure = read_structure(r18, example, [g.module for g in r18_scored])
    ctx.latency_model = new_model(ctx.structure, TARGET, "openvino 1.0")
    (tmp_path / "full").mkdir()
    ctx.reference = backend.export(r18, example, tmp_path / "full", TARGET)
    half = uniform_plan(r18_scored, 0.5, 8, "m", tuple(example.shape), "m")
    (tmp_path / "half").mkdir()
    small = backend.export(apply_plan(r18, half, example), example, tmp_path / "half", TARGET)
    assert not learn_where_time_goes(ctx, small, ctx.structure.widths_of(half))  # no device to take them on: never
    ctx.nodes_device = LocalDevice()
    assert learn_where_time_goes(ctx, ctx.reference, ctx.structure.full_widths())
    assert learn_where_time_goes(ctx, small, ctx.structure.widths_of(half))
    (full_sample, half_sample) = ctx.latency_model.node_samples
    # The unpruned model is its own reference; the half is counted beside it, which takes longer than the half.
    assert full_sample[4] == pytest.approx(sum(full_sample[1]) + sum(full_sample[2]) + full_sample[3])
    assert half_sample[4] > sum(half_sample[1]) + sum(half_sample[2]) + half_sample[3]
    assert sum(half_sample[2]) > 0  # nodes after the layers (residual adds, pooling, reorders) found on the graph
    ctx.latency_model.add(ctx.structure.full_widths(), 1.0)
    assert ctx.latency_model.layerwise is not None and ctx.latency_model.layerwise.after is not None
    gone = replace(small, model=tmp_path / "missing.xml")
    assert not learn_where_time_goes(ctx, gone, ctx.structure.widths_of(half)) and ctx.nodes_device is None
    assert sum("per-node times not taken" in message for message in said) == 1


@pytest.mark.slow
def test_the_model_without_blocks_is_priced_from_the_whole_models_per_node_profile(r18, mbv3, example):
    """--drop-blocks: the whole model's per-node profile (8 plans), mapped onto the model without two of its blocks,
    prices that model's plans within 2% after one measurement of it, where its own per-node times of that one
    measurement (each layer's time scaled by its roofline) miss the layers' fixed costs by more than 5%."""
    from edgeprune.graph.modules import copy_model
    from edgeprune.rewrite.depth import drop_blocks

    structure_of = lambda model: read_structure(model, example)  # noqa: E731  (every group)
    whole = new_model(structure_of(r18), TARGET, "openvino 1.0")
    rng = np.random.default_rng(0)
    efficiency = {layer.name: rng.uniform(0.5, 3.0) for layer in whole.structure.layers}

    def runtime(model, widths):  # per-node times, and the p50 a timer outside the counters sees
        roofline, activations, _ = model.layer_terms(widths)
        per_layer = 0.01 + np.array([efficiency[layer.name] for layer in model.structure.layers]) * roofline
        rest = 0.05 + 2e-7 * activations
        nodes = [(f"/{'/'.join(layer.name.split('.'))}/Conv", "Convolution", float(ms))
                 for layer, ms in zip(model.structure.layers, per_layer, strict=True)]  # fmt: skip
        return nodes + [("Reorder_n1", "Reorder", rest)], 0.3 + 1.1 * (per_layer.sum() + rest)

    def random_widths(structure):
        return np.maximum(8, np.round(structure.channels * rng.uniform(0.3, 1.0, len(structure.channels)) / 8) * 8)

    for widths in [whole.structure.full_widths()] + [random_widths(whole.structure) for _ in range(7)]:
        nodes, p50 = runtime(whole, widths)
        whole.add_nodes(widths, nodes, None)
        whole.add(widths, p50)
    shallow = structure_of(drop_blocks(copy_model(r18), ["layer2.1", "layer3.1"]))
    assert len(shallow.layers) == len(whole.structure.layers) - 4
    # A plan of the whole model, mapped: every layer the model without the blocks keeps is as wide as it was.
    widths = random_widths(whole.structure)
    mapped = shallow.widths_matching(whole.structure, widths)
    names = [layer.name for layer in whole.structure.layers]
    outs = dict(zip(names, whole.structure.layer_widths(widths)[1], strict=True))
    assert [outs[layer.name] for layer in shallow.layers] == list(shallow.layer_widths(mapped)[1])

    borrowed, own = new_model(shallow, TARGET, "openvino 1.0"), new_model(shallow, TARGET, "openvino 1.0")
    assert borrowed.borrow_nodes(whole) == 8 and "the whole model's per-node profile (8 plans)" in borrowed.source
    assert new_model(structure_of(mbv3), TARGET, "openvino 1.0").borrow_nodes(whole) == 0  # another model's layers
    assert new_model(shallow, TARGET, "openvino 1.0").borrow_nodes(None) == 0  # no profile of the whole model
    for model in (borrowed, own):  # then, as a build does, the start's own node times and its p50
        nodes, p50 = runtime(model, shallow.full_widths())
        model.add_nodes(shallow.full_widths(), nodes, None)
        model.add(shallow.full_widths(), p50)
    assert "8 of the profiles are the whole model's" in borrowed.source
    errors, own_errors = [], []
    for _ in range(6):
        widths = random_widths(shallow)
        truth = runtime(borrowed, widths)[1]
        errors.append(abs(borrowed.predict(widths) - truth) / truth)
        own_errors.append(abs(own.predict(widths) - truth) / truth)
    assert max(errors) < 0.02 and max(own_errors) > 0.05, (errors, own_errors)
