"""Small models built in code for the end-to-end tests that need a real build but not a big network (model spec
``tests/data/tiny_models.py:cnn``): a few seconds per build instead of a minute."""

from torch import nn


def cnn() -> nn.Module:
    """Conv-BN-ReLU stem, two residual-free stages, global pooling and a 100-class head (not the task's classes)."""

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    model = nn.Sequential(block(3, 32, 1), block(32, 64, 2), block(64, 96, 2), block(96, 128, 2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 100))  # fmt: skip
    model.edgeprune_input = {"shape": (1, 3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    return model
