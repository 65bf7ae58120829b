"""BatchNorm folding, docs/statistics.md §0, shared by every loader.

    s_i  = gamma_i / sqrt(running_var_i + eps)
    w'_i = s_i * w_i
    b'_i = (b_i - running_mean_i) * s_i + beta_i

Arithmetic is float64; a negative gamma flips the unit's hyperplane.
"""

from __future__ import annotations

import numpy as np


def fold_batchnorm(
    weight: np.ndarray,
    bias: np.ndarray | None,
    mean: np.ndarray,
    var: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
    out_axis: int = 0,
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold inference BatchNorm into the affine layer before it.

    ``out_axis`` is the axis of ``weight`` that indexes output units: 0 for
    convs and linear layers, 1 for transposed convs, whose weight is
    ``(in, out/groups, *k)``; then output unit ``g*(out/groups) + j`` is
    ``weight[g*(in/groups):(g+1)*(in/groups), j]``.
    """
    scale = _scale(mean, var, gamma, eps)
    shift = (beta if beta is not None else 0.0) - np.asarray(mean, np.float64) * scale
    base_bias = np.zeros_like(scale) if bias is None else np.asarray(bias, np.float64)
    new_bias = base_bias * scale + shift
    w = np.asarray(weight, dtype=np.float64)
    if out_axis == 0:
        shape = (-1,) + (1,) * (w.ndim - 1)
        return w * scale.reshape(shape), new_bias
    in_ch, per_group = w.shape[0], w.shape[1]
    grouped = w.reshape(groups, in_ch // groups, per_group, *w.shape[2:])
    s = scale.reshape(groups, 1, per_group, *(1,) * (w.ndim - 2))
    return (grouped * s).reshape(w.shape), new_bias


def fold_affine(
    weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Fold a per-output-channel ``y * scale + shift`` (a Mul/Add pair) into the layer."""
    scale = np.asarray(scale, np.float64).reshape(-1)
    w = np.asarray(weight, np.float64)
    if scale.size == 1:
        scale = np.full(w.shape[0], scale.item())
    base = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64)
    add = 0.0 if shift is None else np.asarray(shift, np.float64).reshape(-1)
    return w * scale.reshape((-1,) + (1,) * (w.ndim - 1)), base * scale + add


def _scale(mean, var, gamma, eps) -> np.ndarray:
    var = np.asarray(var, np.float64)
    g = np.ones_like(var) if gamma is None else np.asarray(gamma, np.float64)
    return g / np.sqrt(var + eps)
