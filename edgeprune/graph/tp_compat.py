"""Workarounds for torch-pruning bugs that stop it from tracing real models, each narrow and named.

Applied once, on import of graph/groups.py (which every trace goes through); every one leaves torch-pruning's
behaviour unchanged where it did not fail.
"""

from __future__ import annotations

import itertools
import threading

from torch import nn
from torch_pruning import ops
from torch_pruning.dependency import DependencyGraph, Group, index_mapping

# A real group lists each (layer, handler) about once, so it never holds more entries than a fraction of the graph's
# nodes (the largest seen: 0.54 per node, a ViT's residual stream; 0.24 DenseNet-121). GROWTH per node is far past
# that and still cheap to reach when the search runs away.
GROWTH = 2
_search = threading.local()


class UnboundedGroup(RuntimeError):
    """torch-pruning's search for one group grew past any real group's size: it cannot follow this part of the
    graph. The group is kept whole."""


def _tolerate_unknown_concat_widths() -> None:
    """torch-pruning 1.6 sums the inferred input widths of a concatenation before it looks for one it could not
    infer (None), and so raises a TypeError on DPN's dual-path blocks, where the graph cannot be built at all. A
    line later it skips such a concatenation anyway (no index mapping); here the TypeError ends in the same skip.
    The groups whose pruning crosses that concatenation are left to the probe, which keeps whole any that fail,
    so the rest of the model can still be pruned. (Not yet seen end to end: torch-pruning then takes minutes to
    list dpn68's groups, and the sweep's build timed out.)"""
    original = index_mapping.update_concat_index_mapping
    if getattr(original, "edgeprune_tolerant", False):
        return

    def update(graph, cat_node) -> None:
        try:
            original(graph, cat_node)
        except TypeError:
            if None not in (getattr(cat_node.module, "concat_sizes", None) or ()):
                raise  # not the bug this works around

    update.edgeprune_tolerant = True
    # update_index_mapping looks the function up in its module's globals on every call, so this reaches it.
    index_mapping.update_concat_index_mapping = update


def _order_split_outputs() -> None:
    """torch-pruning 1.6 gives the k-th consumer of a split (or unbind) the k-th slice's offsets, but lists the
    consumers in the order its backward traversal met them, which is often the reverse: all 34 splits of mixnet_s.
    Index mappings then send a slice's channels to the other slice's convolution. With unequal slices pruning
    failed (MixNet's mixed convs: "expected input to have 6 channels, but got 3"); with equal slices it ran and cut
    the wrong input channels of every consumer, silently. Each consumer's autograd node says which output of the
    split it reads (``output_nr``); here the consumers are put in that order before the offsets are given out."""
    for name in ("update_split_index_mapping", "update_unbind_index_mapping"):
        original = getattr(index_mapping, name)
        if getattr(original, "edgeprune_ordered", False):
            continue

        def update(graph, node, original=original) -> None:
            read = [[nr for fn, nr in getattr(out.grad_fn, "next_functions", ()) if fn is node.grad_fn]
                    for out in node.outputs]  # fmt: skip
            if node.grad_fn is not None and all(len(nrs) == 1 for nrs in read):  # else leave torch-pruning's order
                node.outputs[:] = [out for _, out in sorted(zip(read, node.outputs, strict=True), key=lambda p: p[0])]
            original(graph, node)

        update.edgeprune_ordered = True
        setattr(index_mapping, name, update)  # looked up in the module's globals on every call, as above


def _keep_split_offsets() -> None:
    """torch-pruning 1.6's SplitPruner works out a split's new offsets after a cut but stores them on itself, not on
    the split, whose offsets are what the index mappings read. A model with a split is pruned group after group
    (rewrite/prune.apply_plan), so every group after the first that crosses a split was mapped with the unpruned
    offsets: MixNet's convs were cut by indices of their neighbours' slices ("got 3 channels" where 6 were kept, 22
    of mixnet_s's 38 groups kept whole). Here the split's own offsets follow its new sizes."""
    original = ops.SplitPruner.prune_out_channels
    if getattr(original, "edgeprune_offsets", False):
        return

    def prune(self, layer, idxs):
        result = original(self, layer, idxs)
        if layer.split_sizes is not None:
            layer.offsets = [0, *itertools.accumulate(layer.split_sizes)]
        return result

    prune.edgeprune_offsets = True
    ops.SplitPruner.prune_out_channels = ops.SplitPruner.prune_in_channels = prune


def _bound_group_search() -> None:
    """torch-pruning follows a group through the graph until no new (layer, indices) pair appears. Where index
    mappings keep producing new index subsets around a cycle (timm's EfficientViT-MSRA cascaded attention, DPN's
    dual paths), that search never ends: the sweep's builds of efficientvit_m0 and dpn68 spent 15 minutes listing
    groups, efficientvit_m0's with 36864 indices mapped onto a 192-channel BatchNorm. Here a search raises
    UnboundedGroup instead once it maps more indices onto a layer than the layer has channels, or grows past GROWTH
    entries per graph node."""
    original_search, original_add = DependencyGraph.get_pruning_group, Group.add_dep
    if getattr(original_search, "edgeprune_bounded", False):
        return

    def get_pruning_group(self, module, pruning_fn, idxs):
        outer = getattr(_search, "limit", None), getattr(_search, "graph", None), getattr(_search, "ties", None)
        _search.limit, _search.graph = GROWTH * len(self.module2node) + 64, self
        _search.ties = _Ties()
        if not hasattr(self, "edgeprune_widest"):  # no index list of a real group is longer than the widest layer
            widths = [_width(m, outputs) or 0 for m in self.module2node for outputs in (True, False)]
            self.edgeprune_widest = max([*widths, len(idxs)])
        try:
            group = original_search(self, module, pruning_fn, idxs)
            group.edgeprune_tied = _search.ties.sets([int(i) for i in idxs])
            return group
        finally:
            _search.limit, _search.graph, _search.ties = outer

    def add_dep(self, dep, idxs) -> None:
        limit, graph = getattr(_search, "limit", None), getattr(_search, "graph", None)
        if limit is not None and len(self._group) >= limit:
            raise UnboundedGroup(f"torch-pruning's search for this group did not end (over {limit} entries)")
        if graph is not None:
            width = _width(dep.target.module, graph.is_out_channel_pruning_fn(dep.handler)) or graph.edgeprune_widest
            if len(idxs) > width and len({getattr(i, "idx", i) for i in idxs}) > width:  # repeats alone are harmless
                raise UnboundedGroup(f"torch-pruning maps {len(idxs)} indices onto {width} channels")
        ties = getattr(_search, "ties", None)
        if ties is not None:
            ties.record(dep, idxs, graph.is_out_channel_pruning_fn(dep.handler) if graph is not None else True)
        original_add(self, dep, idxs)

    get_pruning_group.edgeprune_bounded = True
    DependencyGraph.get_pruning_group, Group.add_dep = get_pruning_group, add_dep


class _Ties:
    """Root channels that a group's search maps onto the same channel of some layer, which must be removed together.

    GhostNet concatenates a conv's output with a depthwise conv of that same output, so channels i and i + C of the
    concatenation both come from the conv's channel i. torch-pruning follows both, but then merges each layer's
    indices and so forgets that two root channels met there: removing channel i alone cuts the conv and leaves the
    concatenation's widths inconsistent (the sweep's GhostNets failed with convs pruned to 0 channels). The search's
    own (index, root index) pairs, recorded before that merge, say which root channels meet; a union-find joins them.

    A grouped convolution that is not depthwise (ResNeXt, RegNet) ties channels too: torch-pruning cuts its inputs
    by the kept positions of the first group, so every group must lose the same positions. Channels at the same
    position within their groups count as meeting there.
    """

    def __init__(self) -> None:
        self.first: dict[tuple, dict[int, int]] = {}  # (layer node, handler) → its index → the first root index seen
        self.parent: dict[int, int] = {}

    def record(self, dep, idxs, outputs: bool) -> None:
        seen = self.first.setdefault((id(dep.target), dep.handler), {})
        period = _group_width(dep.target.module, outputs)
        for index in idxs:
            root = getattr(index, "root_idx", None)
            if root is not None and (first := seen.setdefault(index.idx % period, root)) != root:
                self.parent[self._find(root)] = self._find(first)

    def _find(self, index: int) -> int:
        while (up := self.parent.get(index, index)) != index:
            self.parent[index] = self.parent.get(up, up)  # path halving
            index = up
        return index

    def sets(self, roots: list[int]) -> tuple[tuple[int, ...], ...]:
        """The partition of ``roots`` into tied sets, or () when no two root channels are tied."""
        if not self.parent:
            return ()
        found: dict[int, list[int]] = {}
        for root in roots:
            found.setdefault(self._find(root), []).append(root)
        return tuple(tuple(sorted(members)) for members in found.values()) if len(found) < len(roots) else ()


def _group_width(module, outputs: bool) -> int:
    """Channels per group of a grouped, not depthwise, convolution (the period of its tied positions); else a
    period no index reaches."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        width = module.out_channels if outputs else module.in_channels
        if not module.groups == module.in_channels == module.out_channels and width % module.groups == 0:
            return width // module.groups
    return 1 << 62


def _width(module, outputs: bool) -> int | None:
    """The channels a group entry's indices index: a conv's or linear layer's outputs or inputs, a norm's features."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if outputs else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if outputs else module.in_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    return None


_tolerate_unknown_concat_widths()
_order_split_outputs()
_keep_split_offsets()
_bound_group_search()
