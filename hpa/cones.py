"""Cone statistics of two stacked convs (seed 000 §3.3-3.4 and §4; STATISTICS.md §2): the maths.

Arrays in, arrays out: no graph, no framework model.  The plugin
(``plugins/cones.py``) decides which layer pairs qualify and calls
:func:`cone_pair_statistics` once per pair.

A *cone* is one kernel ``u = W_up[i, o]`` of the upper layer; its
*predecessors* are the kernels ``v_p = W_low[o, p]`` of lower filter ``o``.
Per kernel ``x`` with bias ``beta`` over an ``H x W`` plane (``D = H*W``)::

    s(x) = sum(x)      a(x) = -beta / s(x)      alpha(x) = arcsin(|s(x)| / (||x|| sqrt(D)))

Per (cone, predecessor) pair: the apex distance ``d_p = (a(u) - a(v_p)) / sqrt(D)``,
the opening offset ``delta_p = (2/pi) (alpha(u) - alpha(v_p))`` and the
rotation ``rho_p = (1/pi) min_j angle(shift_j(u_perp), v_perp)``.

How the rotation is computed fast, and exactly.  With ``emb`` the row-major
embedding of a kernel in the top-left corner of the plane, the cyclic shift by
``j`` in ``R^D`` moves kernel entry ``(a, b)`` of ``u`` to flat position
``(a*W + b + j) mod D``.  It meets an entry ``(a', b')`` of ``v`` only when
``j = ((a'-a)*W + (b'-b)) mod D``, so only the shifts in that set (at most
``(2k-1)^2`` of them) can have a non-zero inner product; every other shift
contributes exactly 0.  For ``H, W >= 2k-1`` these are the full 2-D
cross-correlation of the two kernels (the spec's first case).  For smaller
planes the same set covers every shift that an FFT over ``D`` would give, so
one formula serves both cases, with no FFT rounding.  The inner products of
all pairs of a chunk are one batched matrix product: ``U (k*k)`` against the
gathered entries of ``v`` at each candidate shift, then a max over shifts.
Because ``<shift_j u_perp, v_perp> = <shift_j emb u, emb v> - s(u) s(v) / D``
and the norms do not depend on ``j``, the smallest angle belongs to the
largest raw inner product.

Everything is float64.  The work is chunked over the lower layer's filters
(and, for very wide layers, the upper filters) so that temporaries stay under
a memory bound, and runs on CUDA when asked to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpa.errors import OptionError

#: The four nesting states of 000 §3.3, in the order of their integer codes.
STATES = ("OUT_FULL_IN", "IN_FULL_OUT", "OUT_PARTIAL_IN", "IN_PARTIAL_OUT")
#: The code of a degenerate cone (no apex, or an all-zero kernel): it has no state.
DEGENERATE = -1

_OUT_FULL_IN, _IN_FULL_OUT, _OUT_PARTIAL_IN, _IN_PARTIAL_OUT = range(4)


@dataclass
class ConePairStatistics:
    """Per-cone results of one layer pair; cones are indexed ``(i, o)`` like ``W_up[i, o]``."""

    states: np.ndarray  # (F_up, C_g_up) int8: index into STATES, DEGENERATE (-1) when degenerate
    distance: np.ndarray  # per cone: mean over predecessors of |d_p| / max|d|; NaN when degenerate
    opening: np.ndarray | None  # per cone: mean |delta_p|; None without a plane size
    rotation: np.ndarray | None  # per cone: mean rho_p over defined rho_p; None without a plane or when skipped
    max_distance: float | None  # max |d| over the pairs of non-degenerate cones (needs the plane)
    max_apex_difference: float | None  # max |a(u) - a(v_p)| over the same pairs (no plane needed)
    plane: tuple[int, int] | None  # (H, W) used for D, or None

    @property
    def n_cones(self) -> int:
        return int(self.states.size)

    @property
    def n_degenerate(self) -> int:
        return int((self.states == DEGENERATE).sum())


# -- biases and kernels -------------------------------------------------------------------

def channel_biases(weight: np.ndarray, bias: np.ndarray | None = None,
                   channel_bias: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """One bias per single-channel kernel, shaped ``(F, C_g)``, and the rule used.

    ``channel_bias`` (the channel-wise-ReLU conv of 000 eq. 4) is used as is:
    ``"per-channel"``.  Otherwise the filter bias is split evenly, ``b / C_g``,
    so that the channel terms add up to the filter's affine map: ``"split"``.
    A missing bias is zero.
    """
    filters, per_group = int(weight.shape[0]), int(weight.shape[1])
    if channel_bias is not None:
        return np.asarray(channel_bias, np.float64).reshape(filters, per_group), "per-channel"
    b = np.zeros(filters) if bias is None else np.asarray(bias, np.float64).reshape(filters)
    return np.repeat((b / per_group)[:, None], per_group, axis=1), "split"


def dilate(weight: np.ndarray, dilation: tuple[int, int] | None) -> np.ndarray:
    """The kernel a dilated conv really applies: zeros between the taps."""
    if dilation is None or all(d == 1 for d in dilation):
        return weight
    k1, k2 = weight.shape[2:]
    d1, d2 = dilation
    out = np.zeros(weight.shape[:2] + ((k1 - 1) * d1 + 1, (k2 - 1) * d2 + 1), dtype=weight.dtype)
    out[:, :, ::d1, ::d2] = weight
    return out


def candidate_shifts(upper_kernel: tuple[int, int], lower_kernel: tuple[int, int],
                     plane: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """The cyclic shifts ``j`` at which ``u`` and ``v`` can overlap, and whether some shift cannot.

    Returns the sorted distinct shifts and ``True`` when there are other shifts,
    whose inner product is exactly 0 (so 0 joins the maximum).
    """
    (ku1, ku2), (kv1, kv2), (height, width) = upper_kernel, lower_kernel, plane
    size = height * width
    dy = np.arange(-(ku1 - 1), kv1)[:, None]
    dx = np.arange(-(ku2 - 1), kv2)[None, :]
    shifts = np.unique(((dy * width + dx) % size).ravel())
    return shifts, len(shifts) < size


def shift_gather_index(upper_kernel: tuple[int, int], lower_kernel: tuple[int, int],
                       plane: tuple[int, int], shifts: np.ndarray) -> np.ndarray:
    """``index[q, j]``: which entry of flattened ``v`` meets entry ``q`` of ``u`` at shift ``shifts[j]``.

    ``kv1*kv2`` (one past the last entry) stands for "no entry of v there" and
    points at a zero appended to every flattened ``v``.
    """
    (ku1, ku2), (kv1, kv2), (height, width) = upper_kernel, lower_kernel, plane
    size = height * width
    a, b = np.divmod(np.arange(ku1 * ku2), ku2)
    position = ((a * width + b)[:, None] + shifts[None, :]) % size
    row, col = np.divmod(position, width)
    inside = (row < kv1) & (col < kv2)
    return np.where(inside, row * kv2 + col, kv1 * kv2)


# -- the statistic -------------------------------------------------------------------------

def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise OptionError(f"cones_device must be auto, cpu or cuda, not {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("cones_device=cuda but torch sees no CUDA device; use cones_device=cpu or auto")
    return torch.device(device)


def cone_pair_statistics(lower_weight: np.ndarray, lower_biases: np.ndarray, upper_weight: np.ndarray,
                         upper_biases: np.ndarray, upper_groups: int = 1,
                         plane: tuple[int, int] | None = None, *, device: Any = "auto",
                         memory_mb: float = 512, rotation: bool = True) -> ConePairStatistics:
    """All cone statistics of one layer pair (STATISTICS.md §2).

    ``lower_weight`` is ``(F_low, C_g_low, k1, k2)`` and ``upper_weight``
    ``(F_up, C_g_up, k1', k2')`` with ``F_low == upper_groups * C_g_up``;
    the biases are per single-channel kernel, shaped like the first two axes
    (see :func:`channel_biases`).  ``plane`` is the ``(H, W)`` both layers act
    on; without it only the states and the normalised distances are computed.
    """
    import torch

    dev = resolve_device(device) if isinstance(device, str) else device
    lower = _Kernels(lower_weight, lower_biases, plane, dev)
    f_low, per_group_up = lower.count, int(upper_weight.shape[1])
    groups = int(upper_groups)
    if f_low != groups * per_group_up or upper_weight.shape[0] % groups:
        raise ValueError(f"upper layer expects {groups * per_group_up} input channels in {groups} groups, "
                         f"the lower layer has {f_low} filters")
    per_filter = upper_weight.shape[0] // groups
    # Upper kernels regrouped by the middle channel o they read: (F_low, F_per_group, ...).
    order = (groups, per_filter, per_group_up)
    up_w = np.asarray(upper_weight, np.float64).reshape(order + upper_weight.shape[2:])
    up_w = up_w.transpose(0, 2, 1, 3, 4).reshape((f_low, per_filter) + upper_weight.shape[2:])
    up_b = np.asarray(upper_biases, np.float64).reshape(order).transpose(0, 2, 1).reshape(f_low, per_filter)
    upper = _Kernels(up_w, up_b, plane, dev)

    states, max_diff = _states(upper, lower)
    keep = states != DEGENERATE
    per_cone = _PerCone(states.shape, dev)
    if keep.any():
        _pair_loop(upper, lower, keep, plane, rotation, memory_mb, per_cone)
    size = None if plane is None else plane[0] * plane[1]
    c = lower.per_filter
    distance = per_cone.dist_sum / c / max_diff if max_diff > 0 else torch.zeros_like(per_cone.dist_sum)
    opening = per_cone.open_sum * (2 / math.pi) / c if plane is not None else None
    rot = per_cone.rot_sum / per_cone.rot_count if plane is not None and rotation else None
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=dev)

    def back(values):  # (F_low, F_per) o-major -> (F_up, C_g_up), NaN for degenerate cones
        if values is None:
            return None
        values = torch.where(keep, values, nan)
        return _to_upper_order(values.cpu().numpy(), groups, per_filter, per_group_up)

    return ConePairStatistics(
        states=_to_upper_order(states.cpu().numpy().astype(np.int8), groups, per_filter, per_group_up),
        distance=back(distance), opening=back(opening), rotation=back(rot),
        max_distance=None if size is None or not keep.any() else max_diff / math.sqrt(size),
        max_apex_difference=float(max_diff) if keep.any() else None,
        plane=None if plane is None else (int(plane[0]), int(plane[1])),
    )


def summarize(stats: ConePairStatistics, bins: int = 40) -> dict[str, Any]:
    """The JSON-ready per-pair summary (counts, fractions, mean/std, histograms)."""
    states = stats.states
    live = states != DEGENERATE
    n_live = int(live.sum())
    counts = {name: int((states == code).sum()) for code, name in enumerate(STATES)}
    out: dict[str, Any] = {
        "n_cones": stats.n_cones,
        "degenerate": stats.n_degenerate,
        "states": counts,
        "fractions": {k: (v / n_live if n_live else None) for k, v in counts.items()},
    }
    histograms = {}
    for key, values in (("distance", stats.distance), ("opening", stats.opening), ("rotation", stats.rotation)):
        finite = None if values is None else values[np.isfinite(values)]
        if finite is None or finite.size == 0:
            out[key] = {"mean": None, "std": None}
            continue
        out[key] = {"mean": float(finite.mean()), "std": float(finite.std())}
        hist, edges = np.histogram(finite, bins=bins, range=(0.0, 1.0))
        histograms[key] = {"edges": edges.tolist(), "counts": hist.tolist()}
    out["plane"] = None if stats.plane is None else list(stats.plane)
    out["max_distance"] = stats.max_distance
    out["histograms"] = histograms
    return out


# -- internals -----------------------------------------------------------------------------

class _Kernels:
    """Per-kernel quantities of a (N, C, k1, k2) weight, as float64 tensors on ``device``."""

    def __init__(self, weight: np.ndarray, biases: np.ndarray, plane, device) -> None:
        import torch

        w = torch.as_tensor(np.asarray(weight, np.float64), device=device)
        self.count, self.per_filter = int(w.shape[0]), int(w.shape[1])
        self.kernel = tuple(int(k) for k in w.shape[2:])
        self.flat = w.reshape(self.count, self.per_filter, -1)
        n = self.flat.shape[-1]
        self.sums = self.flat.sum(-1)
        squares = (self.flat * self.flat).sum(-1)
        bias = torch.as_tensor(np.asarray(biases, np.float64), device=device).reshape(self.sums.shape)
        zero = self.sums == 0
        self.zero = zero | (squares == 0)
        self.apex = torch.where(zero, torch.nan, -bias / torch.where(zero, 1.0, self.sums))
        # |s| / ||x||: alpha(x) = arcsin(ratio / sqrt(D)) is increasing in it, so the states use it directly.
        self.ratio = self.sums.abs() / squares.sqrt()
        self.opening = self.perp_norm = None
        if plane is not None:
            size = plane[0] * plane[1]
            self.opening = torch.arcsin(torch.clamp(self.ratio / math.sqrt(size), max=1.0))
            mean = self.sums / size
            # ||emb(x) - mean*1||: the kernel entries, plus D - k1*k2 zeros that each sit at -mean.
            perp = ((self.flat - mean[..., None]) ** 2).sum(-1) + (size - n) * mean * mean
            self.perp_norm = perp.sqrt()


class _PerCone:
    def __init__(self, shape, device) -> None:
        import torch

        def zeros():
            return torch.zeros(shape, dtype=torch.float64, device=device)

        self.dist_sum, self.open_sum, self.rot_sum, self.rot_count = zeros(), zeros(), zeros(), zeros()


def _states(upper: _Kernels, lower: _Kernels):
    """State codes per cone (o-major, shape (F_low, F_per)) and max |a(u) - a(v_p)|.

    ``A = max_p d_p`` has the sign of ``a(u) - min_p a(v_p)`` (floating-point
    subtraction keeps the sign exactly), and ``Delta = min_p delta_p`` the sign
    of ``ratio(u) - max_p ratio(v_p)``; neither needs D, as the spec says.
    """
    import torch

    low_degenerate = lower.zero.any(1)  # (F_low,)
    degenerate = upper.zero | low_degenerate[:, None]
    a_min = torch.where(lower.zero, torch.inf, lower.apex).amin(1)[:, None]
    a_max = torch.where(lower.zero, -torch.inf, lower.apex).amax(1)[:, None]
    r_max = lower.ratio.amax(1)[:, None]
    a_nonneg = (upper.apex - a_min) >= 0
    u = upper.ratio
    states = torch.where(a_nonneg,
                         torch.where(u <= r_max, _OUT_FULL_IN, _OUT_PARTIAL_IN),
                         torch.where(u >= r_max, _IN_FULL_OUT, _IN_PARTIAL_OUT))
    states = torch.where(degenerate, DEGENERATE, states)
    spread = torch.maximum((upper.apex - a_min).abs(), (upper.apex - a_max).abs())
    live = ~degenerate
    max_diff = float(spread[live].max()) if bool(live.any()) else 0.0
    return states, max_diff


def _pair_loop(upper: _Kernels, lower: _Kernels, keep, plane, rotation: bool, memory_mb: float,
               out: _PerCone) -> None:
    """Sums over predecessors, chunk by chunk; never a Python loop over pairs."""
    import torch

    f_low, per_filter = upper.sums.shape
    c = lower.per_filter
    with_plane = plane is not None
    rotate = with_plane and rotation
    if rotate:
        size = plane[0] * plane[1]
        shifts, has_zero = candidate_shifts(upper.kernel, lower.kernel, plane)
        index = torch.as_tensor(shift_gather_index(upper.kernel, lower.kernel, plane, shifts),
                                device=lower.flat.device)
        n_shifts, n_taps = len(shifts), upper.flat.shape[-1]
        v_padded = torch.cat([lower.flat, lower.flat.new_zeros(f_low, c, 1)], dim=-1)
        low_scaled = lower.sums / size
        rotation_defined = bool((upper.perp_norm[keep] > 0).all()) and bool((lower.perp_norm > 0).all())
    else:
        n_shifts = n_taps = 0
    o_step, f_step = _chunking(f_low, per_filter, c, n_shifts, n_taps, memory_mb, lower.flat.device)
    for o0 in range(0, f_low, o_step):
        o1 = min(o0 + o_step, f_low)
        if not bool(keep[o0:o1].any()):
            continue
        av, alv = lower.apex[o0:o1, None, :], None if not with_plane else lower.opening[o0:o1, None, :]
        if rotate:
            # (O, C, taps, J) -> (O, taps, J*C): the entries of v that meet u's taps at each shift
            gathered = v_padded[o0:o1][:, :, index].permute(0, 2, 3, 1).reshape(o1 - o0, n_taps, -1)
        for f0 in range(0, per_filter, f_step):
            f1 = min(f0 + f_step, per_filter)
            sl = (slice(o0, o1), slice(f0, f1))
            diff = upper.apex[sl][..., None] - av
            out.dist_sum[sl] = diff.abs_().sum(-1)
            del diff
            if with_plane:
                diff = upper.opening[sl][..., None] - alv
                out.open_sum[sl] = diff.abs_().sum(-1)
                del diff
            if rotate:
                _rotation_chunk(upper, lower, sl, gathered, n_shifts, has_zero, low_scaled, rotation_defined,
                                out)


def _rotation_chunk(upper: _Kernels, lower: _Kernels, sl, gathered, n_shifts: int, has_zero: bool,
                    low_scaled, all_defined: bool, out: _PerCone) -> None:
    import torch

    o_slice = sl[0]
    u = upper.flat[sl]  # (O, F, taps)
    n_o, n_f = u.shape[:2]
    inner = torch.bmm(u, gathered).view(n_o, n_f, n_shifts, -1)  # (O, F, J, C)
    best = inner.amax(2)  # (O, F, C): the largest raw inner product over shifts
    del inner
    if has_zero:
        best.clamp_(min=0.0)
    # cos = (<shift emb u, emb v> - s(u) s(v) / D) / (||u_perp|| ||v_perp||)
    best.sub_(upper.sums[sl][..., None] * low_scaled[o_slice, None, :])
    best.div_(upper.perp_norm[sl][..., None]).div_(lower.perp_norm[o_slice, None, :])
    best.clamp_(-1.0, 1.0).arccos_().div_(math.pi)
    if all_defined:
        out.rot_sum[sl] = best.sum(-1)
        out.rot_count[sl] = best.shape[-1]
        return
    defined = torch.isfinite(best)
    out.rot_sum[sl] = torch.where(defined, best, 0.0).sum(-1)
    out.rot_count[sl] = defined.sum(-1).to(torch.float64)


def _chunking(f_low: int, per_filter: int, c: int, n_shifts: int, n_taps: int, memory_mb: float,
              device) -> tuple[int, int]:
    """How many lower filters (and upper filters) per chunk, to stay under ``memory_mb``."""
    budget = max(float(memory_mb), 1.0) * 2**20
    if device.type == "cpu":
        # Small chunks stay in cache; the bound still applies when it is smaller.
        budget = min(budget, 48 * 2**20)
    gathered = 8.0 * c * n_taps * n_shifts
    per_row = 8.0 * c * (n_shifts + 4)  # one upper filter: inner products plus a few (C,) temporaries
    f_step = per_filter
    if gathered + per_filter * per_row > budget:
        f_step = max(1, int((budget - gathered) // per_row))
    per_o = gathered + f_step * per_row
    o_step = max(1, int(budget // per_o)) if f_step == per_filter else 1
    return min(o_step, f_low), min(f_step, per_filter)


def _to_upper_order(values: np.ndarray, groups: int, per_filter: int, per_group_up: int) -> np.ndarray:
    """(F_low = G*C_g_up, F_per) o-major -> (F_up = G*F_per, C_g_up), as W_up[i, o] is indexed."""
    return values.reshape(groups, per_group_up, per_filter).transpose(0, 2, 1).reshape(
        groups * per_filter, per_group_up)
