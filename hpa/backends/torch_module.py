"""Helpers for in-memory ``torch.nn.Module`` inputs to ``hpa.load`` and ``hpa.scan``.

Neither changes the caller's module or its random number generators: a
training loop that scans as it goes must see no difference.
"""

from __future__ import annotations

import copy

import torch

from hpa.backends.torch_files import read_state_dict


def reinitialised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``module`` with every ``reset_parameters`` called under ``seed``.

    The global generators are forked (CPU, and the CUDA devices the module
    lives on), so the caller's random stream is the same afterwards.
    """
    fresh = copy.deepcopy(module)
    devices = sorted({t.device.index or 0 for t in _tensors(fresh) if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
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


def _tensors(module: torch.nn.Module):
    yield from module.parameters()
    yield from module.buffers()
