"""One training epoch and one evaluation pass, on data already on the device."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from hpa.experiments.data import DeviceData, Split, augment, generator, stream_seed
from hpa.experiments.types import Recipe

EVAL_BATCH = 1000


def train_one_epoch(model, optimizer, data: DeviceData, recipe: Recipe, seed: int, epoch: int) -> dict[str, Any]:
    """Train ``model`` for 1-based ``epoch``; returns train_loss and train_accuracy (on augmented batches)."""
    for group in optimizer.param_groups:
        group["lr"] = recipe.lr_at(epoch)
    torch.manual_seed(stream_seed(seed, "dropout", epoch))  # the caller forks the global RNG
    augment_gen = generator(seed, "augment", epoch)
    model.train()
    total_loss = torch.zeros((), dtype=torch.float64, device=data.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.device)
    for index in data.batch_order(seed, epoch, recipe.batch_size):
        raw = data.train.images[index].float() * data.scale
        inputs = (augment(raw, recipe.shift, recipe.flip, augment_gen) - data.mean) / data.std
        labels = data.train.labels[index]
        optimizer.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        # Accumulated on the device: no host sync per batch.
        total_loss += loss.detach().double() * len(index)
        correct += (logits.detach().argmax(1) == labels).sum()
    count = len(data.train)
    return {"train_loss": float(total_loss.item()) / count, "train_accuracy": int(correct.item()) / count}


@torch.no_grad()
def evaluate(model, data: DeviceData, split: Split, prefix: str) -> dict[str, Any]:
    """``{prefix}_loss`` and ``{prefix}_accuracy`` of ``model`` in eval mode on ``split`` (None when empty)."""
    if len(split) == 0:
        return {f"{prefix}_loss": None, f"{prefix}_accuracy": None}
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=data.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.device)
    for start in range(0, len(split), EVAL_BATCH):
        images = data.normalise(split.images[start:start + EVAL_BATCH])
        labels = split.labels[start:start + EVAL_BATCH]
        logits = model(images)
        total_loss += F.cross_entropy(logits, labels, reduction="sum").double()
        correct += (logits.argmax(1) == labels).sum()
    return {f"{prefix}_loss": float(total_loss.item()) / len(split),
            f"{prefix}_accuracy": int(correct.item()) / len(split)}
