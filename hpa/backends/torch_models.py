"""Building framework models cheaply and filling them with weights, for torch-family loaders."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch

from hpa.errors import LoadError


def build_for_weights(builder: Callable[[], torch.nn.Module], state: Mapping[str, Any], what: str) -> torch.nn.Module:
    """Build a model and put ``state`` into it without allocating a second copy of the weights.

    The model is built on the meta device (no memory, no init cost) and the
    tensors of ``state`` (often memory-mapped) are assigned in place.  Models
    with non-persistent buffers, which a state_dict cannot supply, are built
    for real instead.
    """
    with torch.device("meta"):
        model = builder()
    state = {k: (torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        model = builder()
    load_into(model, state, what)
    return model


def load_into(model: torch.nn.Module, state: Mapping[str, Any], what: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                  if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise LoadError(f"the weights do not fit {what}: " + _describe(missing, unexpected, mismatched)
                        + "; check that the file belongs to this architecture (model options such as "
                          "num_classes can be passed with -o num_classes=N)")
    model.load_state_dict(state, strict=True, assign=True)


def _describe(missing, unexpected, mismatched) -> str:
    parts = []
    if mismatched:
        k, got, want = mismatched[0]
        parts.append(f"{k} is {got} in the file but {want} in the model"
                     + (f" (+{len(mismatched) - 1} more)" if len(mismatched) > 1 else ""))
    if missing:
        parts.append(f"{len(missing)} tensors missing from the file (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    return ", ".join(parts)


def seeded(builder: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """Build with the framework's own random init under ``seed``, leaving the caller's generators as they were."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return builder()


def looks_like_path(value: str) -> bool:
    lowered = value.lower()
    return ("/" in value or "\\" in value
            or lowered.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar", ".npz")))
