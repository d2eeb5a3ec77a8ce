"""A pretrained model adapted to the task before pruning: a new classification head when the task's labels are not
the model's classes, fine-tuned on the task's labelled data (``--train``).

The adapted, unpruned model is then the build's baseline: what pruning is measured against (latency), distilled
from (recovery) and compared with (accuracy), as transfer learning with limited data would use it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from edgeprune.errors import BadInput
from edgeprune.rewrite.heads import head_of
from edgeprune.rewrite.recover import EarlyStopping
from edgeprune.score.importance import build_graph, output_layers
from edgeprune.text import is_embedding, trim_padding

ADAPT_LR = 3e-4
TRANSFORMER_BODY_LR = 2e-5


def replace_head(model: nn.Module, example: torch.Tensor, classes: int) -> str:
    """Swap the model's output linear layer for a fresh one with ``classes`` outputs (in place); return its name."""
    heads = [m for m in output_layers(build_graph(model, example)) if isinstance(m, nn.Linear)]
    if len(heads) != 1:
        raise BadInput(f"cannot give this model a {classes}-class head: it has {len(heads)} linear output layers, not"
                       " one; pass a model whose classifier already has the task's classes")  # fmt: skip
    names = {module: name for name, module in model.named_modules()}
    name = names[heads[0]]
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    head = nn.Linear(heads[0].in_features, classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    setattr(parent, attribute, head)
    return name


def fine_tune(model: nn.Module, batches: list, held_out: list, steps: int, lr: float = ADAPT_LR,
              patience: int = 4) -> dict:  # fmt: skip
    """Cross-entropy fine-tuning for at most ``steps`` steps, keeping the weights that score best on ``held_out``
    (checked every tenth of the steps; stop after ``patience`` checks without improvement). Batch norms stay in
    eval mode: a few small batches would only add noise to their statistics."""
    optimizer = torch.optim.Adam(_parameter_groups(model, lr))
    every, watch, done = max(1, steps // 10), EarlyStopping(model, patience), 0
    model.eval()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        loss = F.cross_entropy(model(trim_padding(model, x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        if (done % every == 0 or done == steps) and watch.stop(accuracy(model, held_out)):
            break
    watch.restore()
    return {"steps": done, "held_out_accuracy": watch.best}


def _parameter_groups(model: nn.Module, lr: float) -> list[dict]:
    """One learning rate for a CNN; for a sentence encoder, a small one for the pretrained body and a large one for
    the new classifier. Measured on MiniLM with 60 sentences per class (tools/text_task.py), 150 steps: the CNN's
    3e-4 everywhere, or 5e-5 for the body, left test accuracy at chance (10%); 2e-5 and 1e-3 reached 57%."""
    if getattr(model, "classifier", None) is None or not head_of(model):
        return [{"params": list(model.parameters()), "lr": lr}]
    head = {id(p) for p in model.classifier.parameters()}
    body = [p for p in model.parameters() if id(p) not in head]
    return [{"params": body, "lr": TRANSFORMER_BODY_LR}, {"params": list(model.classifier.parameters()), "lr": 1e-3}]


@torch.no_grad()
def accuracy(model: nn.Module, batches: list) -> float:
    correct = total = 0
    for x, y in batches:
        correct += int((model(trim_padding(model, x)).argmax(1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


def adapt_to_task(model: nn.Module, example: torch.Tensor, data, steps: int, batch: int, say) -> dict | None:
    """With labelled task data whose classes are not the model's outputs: a new head, fine-tuned on the scoring
    split and kept at its best held-out step. None when the labels already are the model's classes."""
    from edgeprune.data import split_held_out

    if data.y is None:
        raise BadInput("--train needs labelled data (an ImageFolder, or an .npz with y); unlabelled data is --calib")
    classes = len(data.class_names) or int(data.y.max()) + 1
    with torch.no_grad():
        outputs = model(example).shape[-1]
    if is_embedding(model):  # a sentence encoder: a classifier on its embedding (edgeprune/text.py)
        model.attach_classifier(classes)
        name = "classifier"
    elif classes == outputs:
        return None
    else:
        name = replace_head(model, example, classes)
    train, held_out = split_held_out(data)
    say(f"the task has {classes} classes, the model {outputs} outputs: a new head '{name}', fine-tuned for at most"
        f" {steps} steps on {len(train)} samples")  # fmt: skip
    done = fine_tune(model, list(train.batches(batch)), list(held_out.batches(batch)), steps)
    say(f"adapted: {done['steps']} steps, held-out accuracy {done['held_out_accuracy']:.3f}")
    return {"head": name, "classes": classes, **done}
