"""Model input: resolve a model spec to an nn.Module, load weights safely, and work out the input the model takes.

Specs (docs/cli.md, ``--model``): ``timm:NAME``, ``hf:LOCAL_DIR`` (a Hugging Face BERT-family encoder saved on
disk, run as a sentence encoder), ``package.module:factory``, ``path/to/file.py:factory``. A factory is called with
no arguments. Weights are a state dict (``.pt``/``.pth`` loaded with ``weights_only=True``, or ``.safetensors``).
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import pickle
import pickletools
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeprune.errors import BadInput
from edgeprune.target import show_value

DEFAULT_MODEL = "edgeprune.zoo:efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """The shape of one input batch and the normalisation the model's training data had."""

    shape: tuple[int, ...]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # Token-id models (sentence encoders) take int64 ids, 0 = padding; ``tokenizer`` is the folder of the Hugging
    # Face tokenizer that turns text files into ids, ``vocab_size`` bounds random ids.
    dtype: str = "float32"
    vocab_size: int = 0
    tokenizer: str = ""

    @property
    def takes_ids(self) -> bool:
        return self.dtype == "int64"

    def example(self) -> torch.Tensor:
        """An input the model runs on for tracing: zeros, or for token ids a fixed sentence of non-padding ids."""
        if self.takes_ids:
            count = int(torch.tensor(self.shape).prod())
            ids = torch.arange(count, dtype=torch.int64) % (max(self.vocab_size, 3) - 2) + 1
            return ids.reshape(self.shape)
        return torch.zeros(self.shape)


@dataclass(frozen=True)
class LoadedModel:
    """A resolved model: the module in eval mode, its spec string, and its input."""

    module: nn.Module
    spec: str
    input: InputSpec
    weights: str | None = None


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``1,3,224,224`` into a tuple of positive ints; a bad shape is a BadInput naming the flag."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise BadInput(f"--input-shape '{text}' is not a list of integers; write it like 1,3,224,224") from None
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise BadInput(f"--input-shape '{text}' needs at least two positive dimensions, e.g. 1,3,224,224")
    return shape


def load_model(
    spec: str = DEFAULT_MODEL,
    weights: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Build the model a spec names, load ``weights`` into it, and check that it runs on the input shape.

    The input shape comes from ``input_shape``, else from what the model declares (timm's pretrained config, or an
    ``edgeprune_input`` attribute a factory sets), else 1×3×224×224. Every failure is a one-line BadInput.
    """
    module, declared = _build(spec)
    if weights:
        load_weights(module, weights, trust_pickle=trust_pickle)
    module.eval()
    spec_input = InputSpec(
        shape=tuple(input_shape or declared.get("shape") or (1, 3, 224, 224)),
        mean=tuple(declared.get("mean", IMAGENET_MEAN)),
        std=tuple(declared.get("std", IMAGENET_STD)),
        dtype=str(declared.get("dtype", "float32")),
        vocab_size=int(declared.get("vocab_size", 0)),
        tokenizer=str(declared.get("tokenizer", "")),
    )
    _check_runs(module, spec, spec_input)
    return LoadedModel(module=module, spec=spec, input=spec_input, weights=weights)


def _build(spec: str) -> tuple[nn.Module, dict]:
    if ":" not in spec:
        raise BadInput(f"model spec '{spec}' has no ':'; use timm:NAME, package.module:factory or file.py:factory")
    source, _, name = spec.rpartition(":")
    if source == "timm":
        return _build_timm(name)
    if source == "hf":
        from edgeprune.text import load_hf_encoder

        return load_hf_encoder(name)
    factory = _load_factory(spec, source, name)
    try:
        module = factory()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the build stops as it would anywhere else
        raise
    except BaseException as exc:  # user code: any failure, sys.exit included, is a failed build, never a traceback
        raise BadInput(f"model factory '{spec}' {_failure(exc)}") from None
    if not isinstance(module, nn.Module):
        raise BadInput(f"model factory '{spec}' returned {type(module).__name__}, not a torch.nn.Module")
    return module, dict(getattr(module, "edgeprune_input", {}) or {})


def _build_timm(name: str) -> tuple[nn.Module, dict]:
    from edgeprune._torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else "; timm.list_models() lists the names"
        raise BadInput(f"timm has no model '{name}'{hint}")
    # pretrained=False: nothing is downloaded at run time; pass --weights for trained weights.
    module = timm.create_model(name, pretrained=False)
    cfg = getattr(module, "pretrained_cfg", {}) or {}
    declared: dict = {}
    if "input_size" in cfg:
        declared["shape"] = (1, *cfg["input_size"])
    if "mean" in cfg and "std" in cfg:
        declared["mean"], declared["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    return module, declared


def _load_factory(spec: str, source: str, name: str):
    # A user's factory commonly builds a timm model, and timm imports torchvision: the same stand-in as for timm:.
    from edgeprune._torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise BadInput(f"model file '{source}' does not exist")
        module_name = f"edgeprune_user_model_{abs(hash(path.resolve()))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise BadInput(f"model file '{source}' cannot be imported as Python")
        py_module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = py_module
        try:
            loader_spec.loader.exec_module(py_module)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            raise BadInput(f"model file '{source}' {_failure(exc, 'failed to import')}") from None
    else:
        try:
            py_module = importlib.import_module(source)
        except KeyboardInterrupt:
            raise
        except SystemExit as exc:
            raise BadInput(f"model spec '{spec}': importing '{source}' {_failure(exc)}") from None
        except BaseException as exc:
            raise BadInput(f"model spec '{spec}': cannot import '{source}': {_one_line(exc)}") from None
    factory = getattr(py_module, name, None)
    if not callable(factory):
        raise BadInput(f"model spec '{spec}': '{source}' has no callable '{name}'")
    return factory


def load_weights(module: nn.Module, path: str, trust_pickle: bool = False) -> None:
    """Load a state dict from ``path`` into ``module``, refusing pickled objects unless ``trust_pickle``.

    ``.safetensors`` files hold tensors only. Other files go through ``torch.load(weights_only=True)``, which
    refuses arbitrary pickled objects; ``trust_pickle`` lifts that for files the user vouches for.
    """
    file = Path(path)
    if not file.is_file():
        raise BadInput(f"weights file '{path}' does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on a file (its pickle protocol, ...) would break one line
            state = _read_state(file, trust_pickle)
    except pickle.UnpicklingError as exc:
        # torch reports both refused pickled objects and bytes that are no pickle at all as UnpicklingError;
        # only the first is worth the --trust-pickle advice.
        if "unsupported global" not in str(exc).lower() and not _names_objects(file):
            raise BadInput(f"weights file '{path}' is not a PyTorch (.pt/.pth) or .safetensors file") from None
        raise BadInput(
            f"weights file '{path}' holds pickled objects that weights_only loading refuses, since unpickling can run"
            " code; save a plain state dict, or pass --trust-pickle if you trust the file"
        ) from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a trusted pickle runs code, which may even call sys.exit
        raise BadInput(f"weights file '{path}' {_failure(exc, 'cannot be read')}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # the common checkpoint layout {"state_dict": ..., "epoch": ...}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(f"weights file '{path}' is not a state dict (a mapping of names to tensors)")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BadInput(f"weights file '{path}' does not fit the model: {_one_line(exc)[:300]}") from None


def _read_state(file: Path, trust_pickle: bool) -> object:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    return torch.load(str(file), map_location="cpu", weights_only=not trust_pickle)


# Opcodes that name a Python object to import and build: what weights_only loading refuses outside its allow-list.
_OBJECT_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST"})
_SCANNED_BYTES = 16 << 20  # the pickle of a state dict is small: its tensors' data lie outside it


def _names_objects(file: Path) -> bool:
    """Whether the file's pickle (a bare pickle, or data.pkl in torch's zip) names Python objects to build, read
    opcode by opcode without running any; bytes that are no pickle name none."""
    try:
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                pickles = [name for name in archive.namelist() if name.endswith(".pkl")]
                with archive.open(pickles[0]) as stream:
                    data = stream.read(_SCANNED_BYTES)
        else:
            with open(file, "rb") as stream:
                data = stream.read(_SCANNED_BYTES)
        stream = io.BytesIO(data)
        while stream.tell() < len(data):  # torch's older format is several pickles, one after another
            if any(opcode.name in _OBJECT_OPCODES for opcode, _, _ in pickletools.genops(stream)):
                return True
    except Exception:  # not a pickle, a truncated one, or an archive without one: nothing to build
        return False
    return False


def _check_runs(module: nn.Module, spec: str, spec_input: InputSpec) -> None:
    shape = spec_input.shape
    try:
        with torch.no_grad():
            module(spec_input.example())
    except KeyboardInterrupt:
        raise
    except SystemExit as exc:
        raise BadInput(f"model '{spec}' {_failure(exc)} when run on input shape {','.join(map(str, shape))}") from None
    except BaseException as exc:
        raise BadInput(
            f"model '{spec}' does not run on input shape {','.join(map(str, shape))}: {_one_line(exc)[:200]};"
            " pass the right --input-shape"
        ) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def exit_call(exc: SystemExit) -> str:
    """How code called sys.exit, for a message: sys.exit(), sys.exit(3), sys.exit('why')."""
    return "sys.exit()" if exc.code is None else f"sys.exit({show_value(exc.code)})"


def _failure(exc: BaseException, failed: str = "failed") -> str:
    """What user code did instead of returning, for a message: "called sys.exit(3)", or "failed: Error: why"."""
    if isinstance(exc, SystemExit):
        return f"called {exit_call(exc)}"
    detail = _one_line(exc)
    return f"{failed}: {type(exc).__name__}" + (f": {detail}" if detail else "")
