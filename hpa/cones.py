"""Cone statistics of two stacked convs (Gamba et al. 2019 §3.3-3.4 and §4; docs/statistics.md §2): the maths.

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
one formula serves both cases, with no FFT rounding.  The entries of ``v``
that meet ``u``'s taps at each candidate shift are gathered once per lower
filter by an exact 0/1 matrix product; the inner products are then matrix
products ``(predecessors x shifts, taps) @ (taps, upper filters)``, and a max
over shifts.  Because ``<shift_j u_perp, v_perp> = <shift_j emb u, emb v> -
s(u) s(v) / D`` and the norms do not depend on ``j``, the smallest angle
belongs to the largest raw inner product.

Where the time goes (VGG-19 at 32x32, 378.5 M pairs): almost all of it in
those products and the max over shifts, both limited by memory traffic, since
each product does only ``taps`` multiply-adds per value.  On a CPU they run
in tiles small enough (:data:`_CPU_TILE_BYTES`) that the ``J`` values of a pair
are reduced while still in the core's cache, inside larger blocks that turn
many pairs into angles per torch call.  The apex and opening terms need no
pairs at all: ``sum_p |x_u - x_p|`` comes from the sorted ``x_p`` and their
prefix sums.

Everything is float64.  Where the best cosine is within ~1e-15 of 1 (a kernel
that is nearly a shift of its predecessor) the spec's ``arccos`` turns a
rounding error ``e`` into an angle error of ``sqrt(2e)``, about 1e-8: any
implementation of the formula shares this.

The work goes in blocks of (lower filters x predecessors x upper filters)
whose temporaries stay under a memory bound; on a CPU the blocks are shared
among worker threads, and on CUDA they run on the GPU, one tile per block.
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


def shift_selector(upper_kernel: tuple[int, int], lower_kernel: tuple[int, int],
                   plane: tuple[int, int], shifts: np.ndarray) -> np.ndarray:
    """0/1 matrix ``S`` of shape ``(kv1*kv2, J*ku1*ku2)``: ``(v @ S)[j*ku1*ku2 + q]`` is the entry of
    flattened ``v`` that meets entry ``q`` of ``u`` at shift ``shifts[j]``, or 0 where none does.

    Gathering by a matrix product is exact (each output is one entry times 1
    plus zeros) and runs as one BLAS call instead of an indexed gather.
    """
    (ku1, ku2), (kv1, kv2), (height, width) = upper_kernel, lower_kernel, plane
    size, taps = height * width, ku1 * ku2
    a, b = np.divmod(np.arange(taps), ku2)
    position = ((a * width + b)[None, :] + shifts[:, None]) % size  # (J, taps)
    row, col = np.divmod(position, width)
    inside = (row < kv1) & (col < kv2)
    selector = np.zeros((kv1 * kv2, len(shifts) * taps))
    selector[(row * kv2 + col)[inside], np.flatnonzero(inside.ravel())] = 1.0
    return selector


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
    """All cone statistics of one layer pair (docs/statistics.md §2).

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
    size = None if plane is None else plane[0] * plane[1]
    c = lower.per_filter
    dist_sum = _abs_difference_sums(upper.apex, lower.apex)
    distance = dist_sum / c / max_diff if max_diff > 0 else torch.zeros_like(dist_sum)
    opening = rot = None
    if plane is not None:
        opening = _abs_difference_sums(upper.opening, lower.opening) * (2 / math.pi) / c
    if plane is not None and rotation:
        sums = _Rotation(states.shape, dev)
        if keep.any():
            _rotation_loop(upper, lower, keep, plane, memory_mb, sums)
        rot = sums.total / sums.count
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
    histograms: dict[str, Any] = {"range": [0.0, 1.0]}  # counts of per-cone means in equal bins
    for key, values in (("distance", stats.distance), ("opening", stats.opening), ("rotation", stats.rotation)):
        finite = None if values is None else values[np.isfinite(values)]
        if finite is None or finite.size == 0:
            out[key] = {"mean": None, "std": None}
            continue
        out[key] = {"mean": float(finite.mean()), "std": float(finite.std())}
        histograms[key] = np.histogram(finite, bins=bins, range=(0.0, 1.0))[0].tolist()
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


class _Rotation:
    """Per cone, the sum of the defined rho_p over its predecessors and how many were defined."""

    def __init__(self, shape, device) -> None:
        import torch

        self.total = torch.zeros(shape, dtype=torch.float64, device=device)
        self.count = torch.zeros(shape, dtype=torch.float64, device=device)


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


def _abs_difference_sums(upper_values, lower_values):
    """``sum_p |x_up[o, i] - x_low[o, p]|`` for every ``(o, i)``, without forming the ``(o, p, i)`` differences.

    With the ``C`` lower values of ``o`` sorted, the sum splits at the rank
    ``k`` of ``x_up`` among them: ``x (2k - C) + total - 2 prefix_k``, so each
    ``o`` costs a sort and a binary search per upper value instead of ``C * F``
    subtractions.  Everything is first centred on the median lower value: then
    every term is at most about twice the largest difference of a live cone, and
    the cancellation costs no more than a few ulps of the result's scale.
    Rows holding NaN (degenerate kernels) give NaN or junk; callers mask them.
    """
    import torch

    low = torch.sort(lower_values, dim=1).values
    count = low.shape[1]
    centre = low[:, count // 2:count // 2 + 1].clone()
    low -= centre
    up = (upper_values - centre).contiguous()
    prefix = torch.nn.functional.pad(low.cumsum(1), (1, 0))
    rank = torch.searchsorted(low.contiguous(), up)
    below = torch.gather(prefix, 1, rank)
    return up * (2 * rank - count).to(up.dtype) + prefix[:, -1:] - 2 * below


def _rotation_loop(upper: _Kernels, lower: _Kernels, keep, plane, memory_mb: float, out: _Rotation) -> None:
    """Sums of rho_p over predecessors, block by block; never a Python loop over pairs.

    On a CPU the blocks of lower filters are shared among ``torch.get_num_threads()``
    Python threads, each running torch single-threaded: torch releases the GIL
    inside its kernels, and independent workers do not stall at the barrier of
    every parallel region when other processes share the cores.
    """
    import torch

    work = _PairWork(upper, lower, keep, plane)
    f_low, per_filter = upper.sums.shape
    dev = lower.flat.device
    workers = 1 if dev.type != "cpu" else max(1, min(torch.get_num_threads(), f_low))
    plan = _chunking(f_low, lower.per_filter, per_filter, work.n_shifts, work.n_taps, memory_mb / workers,
                     cache_bytes=_CPU_TILE_BYTES if dev.type == "cpu" else None)
    if workers > 1 and plan.o_step > 1:
        o_step = min(plan.o_step, -(-f_low // workers))  # at least one block per worker
        plan = _Plan(o_step, plan.p_step, plan.f_step, min(plan.tile_o, o_step), plan.tile_p)
    starts = [o0 for o0 in range(0, f_low, plan.o_step) if bool(keep[o0:o0 + plan.o_step].any())]
    if workers == 1 or len(starts) == 1:
        buffers = work.buffers(plan)
        for o0 in starts:
            work.run(o0, plan, buffers, out)
    else:
        _in_threads(work, starts, plan, workers, out)
    out.total /= math.pi


def _in_threads(work: _PairWork, starts: list[int], plan: _Plan, workers: int, out: _Rotation) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    local = threading.local()

    def task(o0: int) -> None:
        if not hasattr(local, "buffers"):
            # A new thread starts with torch's default intra-op threads (all cores), whatever the
            # caller's thread set: without this each worker's matmuls would fan out again.
            torch.set_num_threads(1)
            local.buffers = work.buffers(plan)
        work.run(o0, plan, local.buffers, out)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(task, starts):
                pass
    finally:
        torch.set_num_threads(threads)


#: Bytes of one matmul tile of inner products on a CPU: it is written and at once reduced over the
#: shifts, so it should stay in a core's L2 cache (1-2 MB on current x86 cores).
_CPU_TILE_BYTES = 2**20


@dataclass(frozen=True)
class _Plan:
    """How the pairs of one layer pair are cut (see :func:`_chunking`)."""

    o_step: int  # lower filters per block (a block's pairs are turned into angles together)
    p_step: int  # predecessors per block
    f_step: int  # upper filters per block
    tile_o: int  # lower filters per matmul tile; > 1 only when a tile holds whole lower filters
    tile_p: int  # predecessors per matmul tile


class _PairWork:
    """What every block of one layer pair shares, and the rotation sums of one block of lower filters.

    Per block every tensor is laid out ``(o, p, i)``: lower filter, predecessor,
    upper filter.  Workspaces are allocated once per worker, because fresh large
    allocations cost page faults that would dominate on a CPU.
    """

    def __init__(self, upper: _Kernels, lower: _Kernels, keep, plane) -> None:
        import torch

        self.upper, self.lower, self.keep, self.plane = upper, lower, keep, plane
        size = plane[0] * plane[1]
        shifts, self.has_zero = candidate_shifts(upper.kernel, lower.kernel, plane)
        # (taps_v, J*taps): v_p @ selector lists, per shift, the entries of v_p that meet u's taps
        self.selector = torch.as_tensor(shift_selector(upper.kernel, lower.kernel, plane, shifts),
                                        device=lower.flat.device)
        self.n_shifts, self.n_taps = len(shifts), upper.flat.shape[-1]
        # Scaling each kernel by 1/||x_perp|| first leaves the best shift unchanged and turns the
        # maximum straight into a cosine; an undefined rotation (x_perp = 0) becomes NaN.
        low_scale = torch.where(lower.perp_norm > 0, 1.0 / lower.perp_norm, torch.nan)
        up_scale = torch.where(upper.perp_norm > 0, 1.0 / upper.perp_norm, torch.nan)
        self.v_scaled = lower.flat * low_scale[..., None]
        self.u_scaled = (upper.flat * up_scale[..., None]).transpose(1, 2).contiguous()  # (F_low, taps, F_per)
        self.low_mean = lower.sums * low_scale / size  # s(v) / (D ||v_perp||)
        self.up_mean = upper.sums * up_scale  # s(u) / ||u_perp||
        self.all_defined = bool(torch.isfinite(self.up_mean[keep]).all()) and bool(
            torch.isfinite(self.low_mean).all())

    def buffers(self, plan: _Plan):
        """(matmul tile, pair block, gathered lower kernels) workspaces of one worker.

        Reused for every block: with threads, freeing and mapping large buffers again costs
        page faults and TLB shootdowns between the cores, which can exceed the arithmetic.
        """
        import torch

        dev = self.lower.flat.device
        sizes = (plan.tile_o * plan.tile_p * self.n_shifts * plan.f_step,
                 plan.o_step * plan.p_step * plan.f_step,
                 plan.o_step * self.lower.per_filter * self.selector.shape[1])
        return tuple(torch.empty(size, dtype=torch.float64, device=dev) for size in sizes)

    def run(self, o0: int, plan: _Plan, buffers, out: _Rotation) -> None:
        import torch

        upper, lower = self.upper, self.lower
        tile, pairs, gathered = buffers
        f_low, per_filter = upper.sums.shape
        c = lower.per_filter
        o1 = min(o0 + plan.o_step, f_low)
        n_o = o1 - o0
        # (O, C, J*taps): the entries of v that meet each tap of u at each candidate shift
        gathered = gathered[: n_o * c * self.selector.shape[1]].view(n_o * c, -1)
        torch.matmul(self.v_scaled[o0:o1].reshape(n_o * c, -1), self.selector, out=gathered)
        gathered = gathered.view(n_o, c, -1)
        for p0 in range(0, c, plan.p_step):
            p1 = min(p0 + plan.p_step, c)
            for f0 in range(0, per_filter, plan.f_step):
                f1 = min(f0 + plan.f_step, per_filter)
                block = pairs[: n_o * (p1 - p0) * (f1 - f0)].view(n_o, p1 - p0, f1 - f0)
                self._best_inner_products(gathered, o0, (p0, p1), (f0, f1), plan, tile, block)
                self._add_angles(block, (slice(o0, o1), slice(f0, f1)), (p0, p1), out)

    def _best_inner_products(self, gathered, o0: int, p_range, f_range, plan: _Plan, tile, block) -> None:
        """``block[o, p, i] = max_j <shift_j u_i, v_p>`` (scaled), one cache-sized matmul tile at a time.

        Each tile is a contiguous run of ``block``: whole lower filters, or
        predecessors of one lower filter.
        """
        import torch

        (p0, p1), (f0, f1) = p_range, f_range
        n_o, _, n_f = block.shape
        n_shifts, n_taps = self.n_shifts, self.n_taps
        u_block = self.u_scaled[o0:o0 + n_o, :, f0:f1]
        # (O, C*J, taps): row p*J + j holds the entries of v_p that meet u's taps at shift j
        rows = gathered.view(n_o, -1, n_taps)[:, p0 * n_shifts:p1 * n_shifts]
        inner = products = None
        for a in range(0, n_o, plan.tile_o):
            b = min(a + plan.tile_o, n_o)
            u = u_block[a:b]
            # split() makes all the tiles' views in one call: this loop runs once per ~10^4 pairs
            for v_rows, best in zip(rows[a:b].split(plan.tile_p * n_shifts, 1), block[a:b].split(plan.tile_p, 1)):
                if inner is None or inner.shape[:2] != best.shape[:2]:
                    inner = tile[: best.numel() * n_shifts].view(b - a, best.shape[1], n_shifts, n_f)
                    products = inner.view(b - a, -1, n_f)
                torch.bmm(v_rows, u, out=products)
                torch.amax(inner, 2, out=best)  # the largest inner product over shifts, per (o, p, i)

    def _add_angles(self, block, cones, p_range, out: _Rotation) -> None:
        """Turn the best inner products of ``block`` into angles and add them to the cones' sums."""
        import torch

        p0, p1 = p_range
        o_slice, f_slice = cones
        if self.has_zero:  # 0 joins the maximum: some shift does not overlap
            block.clamp_(min=0.0)
        # cos = <shift emb u, emb v> / (|u_perp| |v_perp|) - s(u) s(v) / (D |u_perp| |v_perp|)
        block.addcmul_(self.low_mean[o_slice, p0:p1, None], self.up_mean[o_slice, f_slice][:, None, :], value=-1.0)
        # arccos(x) = pi/2 - asin(x), and asin is about twice as fast in torch; the sum of n angles is
        # then n pi/2 - sum(asin), exact to a few ulps of pi/2 (the statistics need 1e-9)
        block.clamp_(-1.0, 1.0).asin_()
        if self.all_defined:
            defined = p1 - p0
        else:
            defined = torch.isfinite(block).sum(1).to(torch.float64)
            block.nan_to_num_(0.0)
        out.count[o_slice, f_slice] += defined
        out.total[o_slice, f_slice] += defined * (math.pi / 2) - block.sum(1)


def _chunking(f_low: int, c: int, per_filter: int, n_shifts: int, n_taps: int, memory_mb: float,
              cache_bytes: float | None = None) -> _Plan:
    """Blocks and matmul tiles of one worker, keeping its temporaries under ``memory_mb``.

    A block of ``O x P x F`` pairs holds one double per pair; it is filled tile
    by tile, each tile holding the ``J`` inner products of its pairs.  On a CPU
    (``cache_bytes`` given) the tile is sized for the cache, so that its values
    are reduced over the shifts before they leave it, and the block is larger,
    so that few torch calls turn many pairs into angles.  Elsewhere (a GPU) a
    tile is a whole block and both are as large as the budget allows.  The
    gathered lower kernels of a block's ``O`` filters count too.
    """
    budget = max(float(memory_mb), 1e-3) * 2**20
    shifts = max(n_shifts, 1)
    tile_bytes = budget / 2 if cache_bytes is None else min(cache_bytes, budget / 4)
    block_bytes = budget / 2 if cache_bytes is None else min(4 * cache_bytes, budget / 4)
    tile_pairs = max(1, int(tile_bytes // (8.0 * shifts)))
    block_pairs = tile_pairs if cache_bytes is None else max(tile_pairs, int(block_bytes // 8))
    f_step = min(per_filter, tile_pairs)
    p_step = min(c, max(1, block_pairs // f_step))
    o_step = 1
    if p_step == c:
        gathered_per_o = 8.0 * c * shifts * (n_taps + 1)
        o_fit = int((budget / 4) // gathered_per_o) if gathered_per_o else f_low
        o_step = max(1, min(block_pairs // (c * f_step), o_fit))
    o_step = min(o_step, f_low)
    per_tile = max(1, tile_pairs // f_step)
    if per_tile >= c * 2 and o_step > 1:  # whole lower filters per tile
        return _Plan(o_step, p_step, f_step, min(o_step, per_tile // c), c)
    return _Plan(o_step, p_step, f_step, 1, min(p_step, per_tile))


def _to_upper_order(values: np.ndarray, groups: int, per_filter: int, per_group_up: int) -> np.ndarray:
    """(F_low = G*C_g_up, F_per) o-major -> (F_up = G*F_per, C_g_up), as W_up[i, o] is indexed."""
    return values.reshape(groups, per_group_up, per_filter).transpose(0, 2, 1).reshape(
        groups * per_filter, per_group_up)
