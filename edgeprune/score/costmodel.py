"""Stage 2: a latency model of this model on this target, so that the scorer can price any candidate plan.

Two sources, and the report always says which one it used:

- **estimate**: a roofline from the target profile's figures (``[estimate]`` peak GFLOP/s and memory GB/s): each
  layer takes max(compute time, memory time). Needs no device, and is only as good as those two figures.
- **profile**: latencies measured on the target's own runtime (`edgeprune profile`, and every round of every build)
  for plans of different widths. Where the runtime also gave per-node times (OpenVINO's counters, taken by
  `edgeprune profile` and by a build's first measurement), each layer gets a fit of its own (``layerwise.py``) and
  the measured p50s scale their sum. Otherwise the p50s are fitted by non-negative least squares to per-kind costs:
  a fixed time, time per conv MAC, per depthwise MAC, per linear MAC, and per byte moved.

With fewer measurements than the full fit needs, the roofline's shape is kept and only scaled (and offset, from two
measurements on), so even the first round of a build starts from a prediction calibrated on the measured baseline.
Samples are cached per target, runtime version and model structure (`profile_path`), so a second build of the same
model starts from everything the first one measured.
"""

from __future__ import annotations

import json
import math
import os
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from edgeprune.score.layerwise import LayerwiseFit, attribute, fit_layerwise
from edgeprune.score.structure import KINDS, Structure
from edgeprune.target import Target

FULL_FIT_SAMPLES = 8  # below this, the 5-coefficient fit is under-determined: scale the roofline instead
MAX_SAMPLES = 64  # the newest are kept: a cache grows with every build of the same model
MIN_VARIABLE = 0.3  # the share of the unpruned model's predicted latency that must depend on the widths
MAX_CACHE_BYTES = 64 << 20  # 64 samples of a large model take a few MB: a larger file is not read
CACHE_VERSION = 2  # 2: node samples split each layer's own nodes from those after it; older ones are not read


@dataclass
class LatencyModel:
    """Predicts a plan's p50 latency in ms from its per-group widths, for one structure on one target."""

    structure: Structure
    target: Target
    samples: list[tuple[list[float], float]] = field(default_factory=list)  # (group widths, measured p50 ms)
    # (group widths, per-layer node ms in structure order, per-layer ms of the nodes after each layer, the other
    # nodes' ms, the unpruned model's summed node ms counted alongside or None), from the runtime's counters
    node_samples: list[tuple[list[float], list[float], list[float], float, float | None]] = field(default_factory=list)
    layerwise: LayerwiseFit | None = None  # fitted to node_samples; when set, p50 ≈ offset + scale × its node sum
    coefficients: np.ndarray | None = None  # per FEATURES, fitted; None when the roofline is scaled instead
    scale: float = 1.0
    offset: float = 0.0
    precision: str = "fp32"
    borrowed: int = 0  # node samples taken from the whole model's profile (borrow_nodes)
    borrowed_offset: float = 0.0  # and its fitted time outside the nodes

    @property
    def source(self) -> str:
        if not self.samples and self.borrowed:
            return (f"the whole model's per-node profile ({self.borrowed} plans) without the removed blocks' layers,"
                    " to be scaled to this model's first measurement")  # fmt: skip
        if not self.samples:
            return "estimate (the target's roofline figures, no measurement)"
        how = "per-kind fit" if self.coefficients is not None else "roofline scaled to the measurements"
        if self.layerwise is not None:
            how = f"per-layer fit to {len(self.node_samples)} per-node profiles, scaled to the measurements"
            if self.borrowed:
                how += f"; {self.borrowed} of the profiles are the whole model's, without the removed blocks' layers"
        return f"profile ({len(self.samples)} measurements on the target, {how})"

    def features(self, widths: np.ndarray) -> np.ndarray:
        """[1, conv MACs, depthwise MACs, linear MACs, bytes moved] under ``widths``."""
        macs, _, moved = self.structure.per_layer(widths, self.precision)
        per_kind = [macs[self.structure.kind_mask(kind)].sum() for kind in KINDS]
        return np.array([1.0, *per_kind, moved.sum()])

    def roofline_ms(self, widths: np.ndarray) -> float:
        """Each layer's max(compute, memory) time at the target's peak figures, summed, in ms."""
        return float(self.layer_terms(widths)[0].sum())

    def layer_terms(self, widths: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """Each layer's roofline time in ms, the activation elements all layers write, and each layer's output
        width, under ``widths``."""
        macs, _, moved = self.structure.per_layer(widths, self.precision)
        compute = 2 * macs / (self.target.estimate.peak_gflops * 1e9)
        memory = moved / (self.target.estimate.memory_gbps * 1e9)
        _, outs = self.structure.layer_widths(widths)
        positions = np.array([layer.out_positions for layer in self.structure.layers], dtype=float)
        return np.maximum(compute, memory) * 1e3, float((outs * positions).sum()), outs

    def nodes_ms(self, widths: np.ndarray) -> float:
        """The per-layer fit's summed node time of ``widths``."""
        return self.layerwise.nodes_ms(*self.layer_terms(widths))

    def predict(self, widths: np.ndarray) -> float:
        if self.layerwise is not None:
            return self.offset + self.scale * self.nodes_ms(widths)
        if self.coefficients is not None:
            return float(self.features(widths) @ self.coefficients)
        return self.offset + self.scale * self.roofline_ms(widths)

    def add(self, widths: np.ndarray, measured_ms: float) -> None:
        """Learn from one measurement and refit."""
        self.samples = (self.samples + [([float(w) for w in widths], float(measured_ms))])[-MAX_SAMPLES:]
        self.fit()

    def add_nodes(self, widths: np.ndarray, nodes: list[tuple], reference_ms: float | None) -> None:
        """Learn where the time of ``widths`` goes, from the runtime's per-node times (``Backend.node_times``);
        ``reference_ms``: the unpruned model's summed node time counted alongside them."""
        found = attribute(nodes, [layer.name for layer in self.structure.layers])
        if reference_ms is None and np.array_equal(widths, self.structure.full_widths()):
            reference_ms = sum(node[2] for node in nodes)  # the unpruned model is its own reference
        sample = ([float(w) for w in widths], found.own, found.after, found.rest, reference_ms)
        self.node_samples = (self.node_samples + [sample])[-MAX_SAMPLES:]
        self.fit()

    def borrow_nodes(self, other: LatencyModel | None) -> int:
        """Take ``other``'s per-node samples, mapped onto this structure, where this is ``other``'s model with
        residual blocks removed (--drop-blocks): a profile of the whole model says how each layer's time responds
        to its width, which one measurement of the model without the blocks cannot (its first round, priced by the
        roofline scaled to that measurement, missed by up to 30%). Each sample keeps the layers this model still
        has; its other nodes' time is scaled by the activations its layers write, as the fit of them assumes.
        Returns how many were taken: none where the layers do not match by name, or ``other`` is None."""
        if other is None:
            return 0
        index = {layer.name: i for i, layer in enumerate(other.structure.layers)}
        kept = [index.get(layer.name) for layer in self.structure.layers]
        if None in kept or not other.node_samples:
            return 0
        borrowed = []
        for widths, own, after, rest, reference in other.node_samples:
            mapped = self.structure.widths_matching(other.structure, np.array(widths))
            if mapped is None:
                return 0
            written = self.layer_terms(mapped)[1] / max(other.layer_terms(np.array(widths))[1], 1e-9)
            borrowed.append(([float(w) for w in mapped], [own[i] for i in kept], [after[i] for i in kept],
                             rest * written, reference))  # fmt: skip
        self.node_samples = (borrowed + self.node_samples)[-MAX_SAMPLES:]  # the newest kept: its own come after
        self.borrowed = len(borrowed)
        self.borrowed_offset = other.offset if other.layerwise is not None else 0.0
        self.fit()
        return len(borrowed)

    def fit(self) -> None:
        """Refit on the samples: the per-layer fit when there are node samples to fit it to; else the per-kind fit
        when there are enough samples and it predicts them better (left out one at a time) than the scaled roofline
        does; else the scaled roofline."""
        self.coefficients, self.layerwise = None, None
        if not self.samples:
            self.scale, self.offset = 1.0, 0.0
            return
        widths = [np.array(w) for w, _ in self.samples]
        measured = np.array([ms for _, ms in self.samples])
        if self.node_samples and self._fit_layerwise(widths, measured):
            return
        roof = np.array([self.roofline_ms(w) for w in widths])
        self.scale, self.offset = _fit_scaled(roof, measured)
        if len(self.samples) < FULL_FIT_SAMPLES:
            self._keep_responsive()
            return
        features = np.array([self.features(w) for w in widths])
        units = features.max(axis=0)
        units[units == 0] = 1.0  # features of very different magnitudes: fit in scaled units
        if _loo_error(features / units, measured, _fit_nnls) < _loo_error(roof[:, None], measured, _fit_scaled_rows):
            self.coefficients = _fit_nnls(features / units, measured) / units
        self._keep_responsive()

    def _fit_layerwise(self, widths: list[np.ndarray], measured: np.ndarray) -> bool:
        """Fit each layer to the node samples and the p50s to their sum; False where the nodes could not be
        attributed to the layers (another exporter's names), and the whole-model fits are used instead."""
        terms = [self.layer_terms(np.array(w)) for w, *_ in self.node_samples]
        # A busy spell slows every node of one sample's run alike; the unpruned model counted alongside says by how
        # much, and each sample is brought to the median level of those references.
        references = [ref for *_, ref in self.node_samples if ref]
        level = float(np.median(references)) if references else 1.0
        factor = np.array([level / ref if ref else 1.0 for *_, ref in self.node_samples])
        self.layerwise = fit_layerwise(
            np.array([roofline for roofline, _, _ in terms]),
            np.array([own for _, own, *_ in self.node_samples]) * factor[:, None],
            np.array([activations for _, activations, _ in terms]),
            np.array([rest for *_, rest, _ in self.node_samples]) * factor,
            np.array([after for _, _, after, *_ in self.node_samples]) * factor[:, None],
            np.array([outs for *_, outs in terms]),
        )
        if self.layerwise is None:
            return False
        nodes = np.array([self.nodes_ms(w) for w in widths])
        if len(measured) == 1 and self.borrowed_offset:
            # One measurement fits a scale only, which would scale the runtime's time outside the nodes with the
            # widths too; that time is the whole model's, blocks or not (its first round: 0.817 ms predicted
            # against 0.885 measured, 0.806 with a scale only; EfficientNet-Lite0 without 7 of its 9 blocks).
            self.offset = min(self.borrowed_offset, measured[0] / 2)
            self.scale = (measured[0] - self.offset) / max(nodes[0], 1e-9)
        else:
            self.scale, self.offset = _fit_scaled(nodes, measured)
        self._keep_responsive()
        return True

    def _keep_responsive(self) -> None:
        """Noisy measurements of a small model can fit "latency is a constant": the allocator would then see nothing
        worth cutting, and a build would stop at the unpruned model. Work must explain at least MIN_VARIABLE of the
        unpruned model's predicted time; a fit that says otherwise gives way to the roofline, only scaled."""
        full = self.structure.full_widths()
        fixed = self.coefficients[0] if self.coefficients is not None else self.offset
        if self.layerwise is not None:
            fixed = self.offset + self.scale * self.layerwise.fixed_ms()
        if fixed > (1 - MIN_VARIABLE) * self.predict(full):
            self.use_scaled_roofline()

    def use_scaled_roofline(self) -> None:
        """Predict with the roofline's shape, only scaled to the samples: the model that always says cutting pays."""
        measured = np.array([ms for _, ms in self.samples])
        roof = np.array([self.roofline_ms(np.array(w)) for w, _ in self.samples])
        self.coefficients, self.layerwise, self.offset = None, None, 0.0
        self.scale = float(np.median(measured / roof)) if len(roof) else 1.0

    def relative_errors(self) -> list[float]:
        """(predicted − measured) / measured for each sample, with the current fit."""
        return [(self.predict(np.array(w)) - ms) / ms for w, ms in self.samples]

    def save(self, path: Path, runtime: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": CACHE_VERSION, "target": self.target.name, "runtime": runtime,
                "structure": self.structure.key, "groups": self.structure.groups, "samples": self.samples,
                "node_samples": self.node_samples}  # fmt: skip
        write_whole(path, json.dumps(data))  # builds sharing the cache: the last one's samples are kept, whole


def write_whole(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file of this writer's own beside it, renamed into place:
    readers see the old file or the new one, never a part, and concurrent writers never share a temporary file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("x") as f:  # "x": never opens another writer's file
            f.write(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # only where the rename did not happen


def new_model(structure: Structure, target: Target, runtime: str) -> LatencyModel:
    """The model for ``structure`` on ``target``, starting from the cached measurements when there are some."""
    model = LatencyModel(structure, target, precision=target.precision)
    try:
        model.samples, model.node_samples = _read_cache(profile_path(target, runtime, structure), structure)
    except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError):
        pass  # no cache, or one from another version, or damaged: start from the estimate
    model.fit()
    return model


def _read_cache(path: Path, structure: Structure) -> tuple[list, list]:
    """The cached samples of ``structure`` at ``path``; ValueError where they are not finite or do not fit it."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_CACHE_BYTES:  # a FIFO would block, a huge file fill memory
        raise ValueError(f"{path} is not a regular file of at most {MAX_CACHE_BYTES} bytes")
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict) or (data.get("structure"), data.get("groups")) != (structure.key, structure.groups):
        return [], []
    groups, layers = len(structure.full_widths()), len(structure.layers)
    samples = [(_floats(w, groups), _floats([ms])[0]) for w, ms in data["samples"]][-MAX_SAMPLES:]
    if not all(ms > 0 for _, ms in samples):
        raise ValueError("a cached p50 is not positive")
    if not samples or data.get("version") != CACHE_VERSION:  # older node samples lack what follows each layer
        return samples, []
    nodes = []
    for w, own, after, rest, ref in data.get("node_samples", [])[-MAX_SAMPLES:]:
        reference = None if ref is None else _floats([ref])[0]
        nodes.append((_floats(w, groups), _floats(own, layers), _floats(after, layers), _floats([rest])[0], reference))
    return samples, nodes


def _floats(values: list, length: int | None = None) -> list[float]:
    floats = [float(v) for v in values]
    if (length is not None and len(floats) != length) or not all(math.isfinite(v) and v >= 0 for v in floats):
        raise ValueError("a cached sample is not finite, negative or of another length")
    return floats


def cache_dir() -> Path:
    """$EDGEPRUNE_CACHE, else $XDG_CACHE_HOME/edgeprune, else ~/.cache/edgeprune."""
    if os.environ.get("EDGEPRUNE_CACHE"):
        return Path(os.environ["EDGEPRUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeprune"


def profile_path(target: Target, runtime: str, structure: Structure) -> Path:
    """Where the measurements of ``structure`` on ``target`` with ``runtime`` (name and version) are cached."""
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in runtime)
    return cache_dir() / "profiles" / target.name / safe / f"{structure.key}.json"


def _fit_scaled(roof: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    """measured ≈ offset + scale·roof, both ≥ 0; a pure scale from one sample."""
    if len(roof) == 1 or np.ptp(roof) < 1e-9:
        return float(np.median(measured / roof)), 0.0
    (offset, scale), _ = nnls(np.column_stack([np.ones_like(roof), roof]), measured)
    return (float(scale), float(offset)) if scale > 0 else (float(np.median(measured / roof)), 0.0)


def _fit_scaled_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    scale, offset = _fit_scaled(x[:, 0], y)
    return np.array([scale, offset])


def _fit_nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return nnls(x, y)[0]


def _loo_error(x: np.ndarray, y: np.ndarray, fit) -> float:
    """Median relative error of predicting each sample from a fit on the others."""
    errors = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        coefficients = fit(x[keep], y[keep])
        if fit is _fit_scaled_rows:
            predicted = coefficients[1] + coefficients[0] * x[i, 0]
        else:
            predicted = x[i] @ coefficients
        errors.append(abs(predicted - y[i]) / y[i])
    return float(np.median(errors))
