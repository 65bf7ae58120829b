"""Helpers for in-memory ``torch.nn.Module`` inputs to ``hpa.load`` and ``hpa.scan``."""

from __future__ import annotations

import copy

import torch

from hpa.backends.torch_files import read_state_dict


def reinitialised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``module`` with every ``reset_parameters`` called under ``seed``."""
    fresh = copy.deepcopy(module)
    torch.manual_seed(seed)
    for sub in fresh.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh


def with_state_dict(module: torch.nn.Module, path: str, trust_pickle: bool = False) -> torch.nn.Module:
    """A copy of ``module`` holding the weights saved at ``path``."""
    state = read_state_dict(path, trust_pickle=trust_pickle)
    snapshot = copy.deepcopy(module)
    snapshot.load_state_dict(state)
    return snapshot
