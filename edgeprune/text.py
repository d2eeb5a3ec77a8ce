"""Text models: Hugging Face BERT-family encoders run as sentence encoders (their data: edgeprune/tokens.py).

A sentence encoder here takes one int64 tensor of token ids (batch × sequence length, 0 = padding) and returns the
mean-pooled embedding of the non-padding tokens, L2-normalised as sentence-transformers does. The attention mask is
derived from the ids inside the model, so every backend sees one fixed-shape input, as an edge runtime wants: the
sequence length is the budget's, set by ``--input-shape 1,L``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from edgeprune.errors import BadInput

DEFAULT_LENGTH = 128


class SentenceEncoder(nn.Module):
    """A transformer encoder with mean pooling over non-padding tokens (and optional L2 normalisation)."""

    edgeprune_output = "embedding"  # judged by cosine similarity, distilled with a cosine loss

    def __init__(self, encoder: nn.Module, pad_id: int = 0, normalize: bool = True) -> None:
        super().__init__()
        self.encoder, self.pad_id, self.normalize = encoder, pad_id, normalize
        self.classifier: nn.Linear | None = None

    def attach_classifier(self, classes: int) -> None:
        """Put a fresh linear classifier on the mean-pooled features (a labelled task): the output becomes logits."""
        width = self.encoder.config.hidden_size
        self.classifier = nn.Linear(width, classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        self.edgeprune_output = "logits"

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids != self.pad_id
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        if self.classifier is not None:  # on the pooled features: normalised ones make logits too small to train
            return self.classifier(pooled)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


def is_embedding(model: nn.Module) -> bool:
    """Whether ``model`` outputs embeddings (judged by cosine similarity), not class logits."""
    return getattr(model, "edgeprune_output", "") == "embedding"


def trim_padding(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` without the trailing columns that are padding in every row, for a token-id model (else ``x`` as is).

    Sentences padded to the budget's sequence length are mostly padding; the mask keeps padding out of attention and
    pooling, so dropping it changes no output but makes training and scoring several times faster."""
    real = token_mask(model, x)
    if real is None:
        return x
    used = real.any(dim=0).nonzero()
    return x[:, : int(used.max()) + 1] if len(used) else x[:, :1]


def bucket_by_length(model: nn.Module, batches: list, seed: int = 0, pool: int = 50) -> list:
    """``batches`` regrouped so that sentences of similar length share a batch, for a token-id model (else as is).

    A batch is trimmed to its longest sentence, and docstring sentences average 25 tokens while a random batch of 16
    reaches 58: most of a training step went on padding. As Hugging Face's ``group_by_length`` does, samples are
    shuffled (seeded), sorted by length within pools of ``pool`` batches, cut into batches of the same size, and the
    batches shuffled, so that batch order stays random. Labels travel with their samples."""
    if not batches or token_mask(model, batches[0][0]) is None:
        return batches
    size = len(batches[0][0])
    x = torch.cat([b[0] for b in batches])
    y = None if any(b[1] is None for b in batches) else torch.cat([b[1] for b in batches])
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    lengths = token_mask(model, x).sum(dim=1)
    chunks = []
    for start in range(0, len(order), size * pool):
        members = order[start : start + size * pool]
        members = members[torch.argsort(lengths[members], stable=True)]
        chunks += list(members.split(size))
    chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=generator)]
    return [(x[c], None if y is None else y[c]) for c in chunks]


def token_mask(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Where ``x`` holds real tokens (not padding), for a token-id model's batch of ids; None for anything else."""
    pad = getattr(model, "pad_id", None)
    if pad is None or x.dtype != torch.int64 or x.dim() != 2:
        return None
    return x != pad


def similarity_loss(embeddings: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """A label-free loss on a batch of embeddings: each must stay most similar to itself among the batch's (the
    in-batch contrastive objective of sentence encoders, against the batch's own detached embeddings). Unlike a
    distillation loss against the unpruned model, its gradient is not zero at the unpruned model, so first-order
    (Taylor) importance can use it."""
    logits = F.normalize(embeddings, dim=-1) @ F.normalize(embeddings, dim=-1).detach().T / temperature
    return F.cross_entropy(logits, torch.arange(len(embeddings)))


def load_hf_encoder(directory: str | Path) -> tuple[nn.Module, dict]:
    """Load the BERT-family encoder saved in ``directory`` (config.json + weights, as ``save_pretrained`` or a
    sentence-transformers folder writes it) as a SentenceEncoder, with what its input is: int64 ids, the vocabulary
    size, and the tokenizer folder. Nothing is downloaded (HF_HUB_OFFLINE); a folder that is not such a model is a
    one-line BadInput."""
    folder = Path(directory)
    if not (folder / "config.json").is_file():
        raise BadInput(f"hf:{directory}: no config.json there; pass the folder a Hugging Face model was saved in")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from edgeprune._torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()  # transformers imports torchvision when it is installed
    try:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        # eager attention: plain matmul and softmax, which torch-pruning traces and every exporter lowers;
        # no pooler: the sentence embedding is the mean of the tokens, the pooler's output is never used.
        encoder = AutoModel.from_pretrained(str(folder), attn_implementation="eager", add_pooling_layer=False)
    except ImportError:
        raise BadInput("hf: models need the transformers package: pip install 'edgeprune[text]'") from None
    except Exception as exc:
        raise BadInput(f"hf:{directory} cannot be loaded: {' '.join(str(exc).split())[:200]}") from None
    model = SentenceEncoder(encoder.eval(), pad_id=int(encoder.config.pad_token_id or 0),
                            normalize=_normalizes(folder))  # fmt: skip
    declared = {"shape": (1, DEFAULT_LENGTH), "dtype": "int64", "vocab_size": int(encoder.config.vocab_size),
                "tokenizer": str(folder) if (folder / "tokenizer.json").is_file() else ""}  # fmt: skip
    return model, declared


def _normalizes(folder: Path) -> bool:
    """Whether the sentence-transformers pipeline saved with the model ends in a Normalize module."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return True
    return any("Normalize" in str(entry.get("type", "")) for entry in json.loads(modules.read_text()))
