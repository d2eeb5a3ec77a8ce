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


class Residual(nn.Module):
    """conv-BN-ReLU-conv-BN added to its input, then ReLU; with ``stride`` 2, a 1×1 projection on the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))  # fmt: skip
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


def resnet() -> nn.Module:
    """A stem, a stage of two residual blocks, a plain conv block that keeps the shape (not residual), a downsampling
    residual block with a projection (not removable: it changes the shape) and one more residual block, then a
    100-class head: depth pruning (``--drop-blocks``) may remove stage1.0, stage1.1 and stage2.1 only."""
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()))
    model.add_module("stage1", nn.Sequential(Residual(32, 32), Residual(32, 32)))
    model.add_module("plain", nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()))
    model.add_module("stage2", nn.Sequential(Residual(32, 64, 2), Residual(64, 64)))
    model.add_module("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 100)))
    model.edgeprune_input = {"shape": (1, 3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    return model
