"""OpenVINO IR for x86 (and Intel GPU/NPU) targets: converted from the simplified ONNX with OpenVINO's converter."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from edgeprune.backends.base import Artifact, Backend
from edgeprune.backends.onnx import export_onnx
from edgeprune.errors import BadInput
from edgeprune.target import Target


def _stable_names(model) -> None:
    """Rename nodes OpenVINO named from its process-wide counter (``Reshape_10158``) by type and graph position.

    The counter depends on how many models the process converted before, so the same model would otherwise give
    different IR bytes from one build to the next; names the ONNX graph gave are kept.
    """
    for index, op in enumerate(model.get_ordered_ops()):
        # Counter names are a word and a number; a folded constant keeps its source op's (Reshape_10158 on a Const).
        if re.fullmatch(r"[A-Za-z]+_\d+", op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_n{index}")


class OpenVinoBackend(Backend):
    """ONNX → OpenVINO IR (model.xml + model.bin), run on the CPU plugin with the target's threads and precision."""

    name = "openvino"
    runtime = "openvino"
    package = "openvino"
    extra = "openvino"

    def export(
        self, model: nn.Module, example: torch.Tensor, out_dir: Path, target: Target,
        calibration: torch.Tensor | None = None,
    ) -> Artifact:  # fmt: skip
        self.require()
        if target.precision.startswith("int8"):
            raise BadInput(
                f"target '{target.name}' asks for {target.precision}, which the openvino backend does not build yet;"
                " use fp32 or fp16"
            )
        import openvino as ov

        out_dir = Path(out_dir)
        onnx_path = export_onnx(model, example, out_dir / "model.onnx")
        xml = out_dir / "model.xml"
        converted = ov.convert_model(str(onnx_path))
        _stable_names(converted)
        # save_model compresses weights to fp16 by default; an fp32 target must keep fp32 weights.
        ov.save_model(converted, str(xml), compress_to_fp16=target.precision == "fp16")
        return Artifact(
            backend=self.name, model=xml, files={"model": xml, "weights": xml.with_suffix(".bin"), "onnx": onnx_path}
        )
