"""A stand-in for the few torchvision names that timm imports, for machines without a working torchvision.

timm imports ``torchvision.ops.misc.FrozenBatchNorm2d`` in its layers and torchvision's datasets and transforms in
``timm.data``, although building a model never uses them. No torchvision build matches the CPU build of torch that
edgeprune pins (the registry's wheel links CUDA libraries and fails on import), so edgeprune installs this stand-in
only when ``import torchvision`` fails. ``FrozenBatchNorm2d`` is real; every other name is a placeholder that raises
a clear ImportError when it is called, so nothing can silently misbehave.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

import torch
from torch import nn

_MESSAGE = "torchvision is not usable here; edgeprune builds timm models without it, but {name} needs the real one"


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (torchvision.ops.misc.FrozenBatchNorm2d)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # A BatchNorm2d state dict loads into it, as into torchvision's: the batch counter has no place here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class _PlaceholderMeta(type):
    # Class attributes (InterpolationMode.BILINEAR, ...) resolve to further placeholders so module-level code imports.
    def __getattr__(cls, attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _placeholder(f"{cls.__name__}.{attr}")


class _Placeholder(metaclass=_PlaceholderMeta):
    def __new__(cls, *args: object, **kwargs: object) -> _Placeholder:
        raise ImportError(_MESSAGE.format(name=cls.__name__))


def _placeholder(name: str) -> type:
    return _PlaceholderMeta(name, (_Placeholder,), {})


class _ShimModule(types.ModuleType):
    def __getattr__(self, attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _placeholder(f"{self.__name__}.{attr}")


class _ShimFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _ShimModule(spec.name)
        module.__path__ = []  # a package, so that any submodule can be imported from it
        if spec.name == "torchvision.ops.misc":
            module.FrozenBatchNorm2d = FrozenBatchNorm2d
        if spec.name == "torchvision":
            module.__version__ = "0.0+edgeprune-shim"
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def ensure_torchvision_importable() -> bool:
    """Install the stand-in when torchvision is missing or broken; return True when the stand-in is in use."""
    if any(isinstance(f, _ShimFinder) for f in sys.meta_path):
        return True
    try:
        import torchvision  # noqa: F401

        return False
    except Exception:  # a missing package or a build that does not match this torch both end here
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    sys.meta_path.insert(0, _ShimFinder())
    return True
