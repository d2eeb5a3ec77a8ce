"""Energy scores: the channels of a group ranked by what they feed the layers that read them (score/energy.py)."""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.graph.groups import build_graph, prunable_groups
from edgeprune.score.energy import _column_energy, energy_scores
from edgeprune.score.importance import score_groups


def _batches(shape, count=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *shape, generator=generator), None) for _ in range(count)]


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.head(self.conv2(x).mean((2, 3)))


def _group(scored, name):
    return next(g for g in scored if g.module == name)


def test_a_channel_with_the_largest_weights_that_never_fires_is_the_first_energy_drops():
    """Magnitude keeps a channel for its weights; energy sees that, on the task's inputs, it is always zero after its
    ReLU and feeds the next layer nothing: the case where L1 magnitude kept 0.846 top-1 agreement on ResNet-18 at a
    uniform ratio of 0.3 and energy 0.943 (README)."""
    torch.manual_seed(0)
    model = ConvNet().eval()
    with torch.no_grad():
        model.conv1.weight[0] *= 10  # the largest filter by far
        model.bn1.bias[0] = -1e4  # and always below zero before its ReLU
    example = torch.zeros(1, 3, 16, 16)
    magnitude = _group(score_groups(model, example, "magnitude"), "conv1")
    energy = _group(score_groups(model, example, "energy", _batches((3, 16, 16))), "conv1")
    assert int(magnitude.scores.argmax()) == 0 and 0 in magnitude.best(15)
    assert float(energy.scores[0]) == 0.0 and 0 not in energy.best(15)
    assert not energy.comparable  # raw energies are compared within a group, not across groups
    listed = prunable_groups(model, build_graph(model, example))
    model.train()  # scored as it runs in inference, its statistics untouched, its mode given back
    statistics = model.bn1.running_mean.clone()
    energy_scores(model, listed, _batches((3, 16, 16)))
    assert model.training and torch.equal(model.bn1.running_mean, statistics)


def test_a_score_is_the_readers_column_energy_times_the_channels_input_energy():
    """For a linear reader the score is exactly ||W[:, c]||² · E[x_c²] over the batches."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    batches = _batches((6,), count=3)
    scored = score_groups(model, torch.zeros(1, 6), "energy", batches)
    hidden = torch.cat([torch.relu(model[0](x)) for x, _ in batches])
    expected = model[2].weight.detach().pow(2).sum(0) * hidden.pow(2).mean(0)
    torch.testing.assert_close(_group(scored, "0").scores, expected, rtol=1e-5, atol=1e-7)


def test_a_grouped_conv_reads_each_channel_with_its_own_groups_filters_only():
    conv = nn.Conv2d(8, 12, 3, groups=4)
    expected = torch.stack(
        [conv.weight.detach()[(c // 2) * 3 : (c // 2 + 1) * 3, c % 2].pow(2).sum() for c in range(8)]
    )
    torch.testing.assert_close(_column_energy(conv), expected)
    transposed = nn.ConvTranspose2d(8, 6, 3)
    torch.testing.assert_close(_column_energy(transposed), transposed.weight.detach().pow(2).flatten(1).sum(1))


class InvertedResidual(nn.Module):
    """MobileNet's block: an expansion, a depthwise conv, a projection. One group (torch-pruning roots it at the
    depthwise conv) cuts the expansion's outputs and the depthwise conv's both sides; what they feed is the
    projection's input."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(4, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = nn.Conv2d(16, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.project(torch.relu(self.dw(torch.relu(self.expand(x)))))
        return self.head(x.mean((2, 3)))


def test_a_depthwise_conv_passes_its_channels_on_and_its_reader_counts():
    torch.manual_seed(2)
    model = InvertedResidual().eval()
    batches = _batches((4, 8, 8))
    scored = score_groups(model, torch.zeros(1, 4, 8, 8), "energy", batches)
    into_projection = torch.cat([torch.relu(model.dw(torch.relu(model.expand(x)))) for x, _ in batches])
    expected = _column_energy(model.project) * into_projection.pow(2).mean((0, 2, 3))
    torch.testing.assert_close(_group(scored, "dw").scores, expected.detach(), rtol=1e-5, atol=1e-7)


class LayerNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.norm = nn.LayerNorm(10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def test_a_group_normalised_across_its_channels_is_scored_by_l1_magnitude():
    """Removing a channel under a LayerNorm rescales the others too, which the energy after the norm cannot see:
    ConvNeXt-atto's residual streams scored by energy kept 0.831 top-1 agreement at ratio 0.5, by L1 0.868."""
    torch.manual_seed(3)
    model = LayerNormed().eval()
    example = torch.zeros(1, 6)
    energy = _group(score_groups(model, example, "energy", _batches((6,))), "fc1")
    magnitude = _group(score_groups(model, example, "magnitude"), "fc1")
    torch.testing.assert_close(energy.scores, magnitude.scores)


def test_energy_without_data_is_refused():
    import pytest

    with pytest.raises(ValueError, match="at least one batch"):
        score_groups(ConvNet().eval(), torch.zeros(1, 3, 16, 16), "energy", [])


class Upsampling(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.up(torch.relu(self.conv(x))).mean((2, 3)))


def test_a_transposed_conv_reads_each_channel_with_its_own_row():
    torch.manual_seed(4)
    model = Upsampling().eval()
    batches = _batches((3, 8, 8))
    scored = score_groups(model, torch.zeros(1, 3, 8, 8), "energy", batches)
    into_up = torch.cat([torch.relu(model.conv(x)) for x, _ in batches])
    expected = model.up.weight.detach().pow(2).flatten(1).sum(1) * into_up.pow(2).mean((0, 2, 3))
    torch.testing.assert_close(_group(scored, "conv").scores, expected.detach(), rtol=1e-5, atol=1e-7)


class StdConv2d(nn.Conv2d):
    """A conv that standardises its weight before it multiplies by it, as timm's does."""

    def forward(self, x):
        weight = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
        return nn.functional.conv2d(x, weight, self.bias, self.stride, self.padding)


class PaddedConv2d(nn.Conv2d):
    """A conv with a forward of its own that uses its weight as stored (EfficientNet-Lite0's same-padding convs)."""

    def forward(self, x):
        return nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride)


def test_a_group_read_by_a_weight_standardised_conv_keeps_l1s_ranking():
    """All of a group's readers are scored or none: a reader whose weight is not the one it multiplies by is not. A
    conv with a forward of its own that uses its weight as stored is scored."""
    torch.manual_seed(5)
    example = torch.zeros(1, 3, 16, 16)
    scores = {}
    for reader in (StdConv2d, PaddedConv2d):
        model = ConvNet().eval()
        model.conv2 = reader(16, 8, 3, padding=0 if reader is PaddedConv2d else 1)
        energy = _group(score_groups(model, example, "energy", _batches((3, 16, 16))), "conv1").scores
        scores[reader] = energy, _group(score_groups(model, example, "magnitude"), "conv1").scores
    torch.testing.assert_close(*scores[StdConv2d])
    assert not torch.allclose(*scores[PaddedConv2d])


class BatchOfOne(ConvNet):
    def forward(self, x):
        if len(x) > 1:
            raise RuntimeError("this model takes one image at a time")
        return super().forward(x)


def test_a_model_whose_code_fails_on_the_task_data_builds_without_energys_choice():
    from edgeprune.search.steepness import other_channel_scores

    said = []
    choices = other_channel_scores(BatchOfOne().eval(), torch.zeros(1, 3, 16, 16), _batches((3, 16, 16)), said.append)
    assert set(choices) == {"l2", "l1"}
    assert said == ["channels by the energy they feed their readers not offered: RuntimeError: this model takes one"
                    " image at a time"]  # fmt: skip
