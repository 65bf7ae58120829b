"""Every code path of the fast cone computation agrees with the oracle of ``test_cones.py``.

The CPU path cuts the pairs into cache-sized matmul tiles inside larger
blocks, shares the blocks among threads, and sums the apex and opening
differences through sorted prefix sums; the GPU path uses one tile per block.
Each test forces one of these paths (and checks that it really was taken),
then compares the per-cone results with the spec computed literally.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpa import cones
from test_cones import assert_matches_oracle, oracle, random_pair


@pytest.fixture
def plans(monkeypatch):
    """The plans ``_chunking`` hands to the rotation loop during a test."""
    seen = []
    chunking = cones._chunking

    def spy(*args, **kwargs):
        seen.append(chunking(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(cones, "_chunking", spy)
    return seen


def with_degenerate_cones(lw, uw):
    """A zero-sum upper kernel and a zero-sum predecessor: masked cones inside the blocks."""
    uw[1, 0] = 0.0
    uw[1, 0, 0, :2] = [1.0, -1.0]
    lw[-1, 0] = 0.0
    lw[-1, 0, 1, :2] = [2.0, -2.0]
    return lw, uw


# (memory_mb, tile bytes, torch threads): what each case makes the plan do
PATHS = {
    "whole lower filters per tile, two threads": (512, 2**20, 2),
    "whole lower filters per tile, one thread": (512, 2**20, 1),
    "several tiles per block, partial last tile": (512, 8 * 25 * 3 * 2, 2),
    "one predecessor row per tile, filters split": (0.002, 8.0, 1),
    "GPU plan: one tile per block": (512, None, 1),
    "GPU plan under a tiny memory bound": (1e-4, None, 2),
}


@pytest.mark.parametrize("plane", [(8, 8), (5, 5), (3, 4)], ids=["with-zero-shift", "all-shifts", "small-plane"])
@pytest.mark.parametrize("path", list(PATHS))
def test_each_blocking_path_matches_oracle(path, plane, plans, monkeypatch):
    memory_mb, tile_bytes, threads = PATHS[path]
    monkeypatch.setattr(cones, "_CPU_TILE_BYTES", tile_bytes)
    rng = np.random.default_rng(len(path) + plane[0])
    lw, lb, uw, ub = random_pair(rng, 8, 5, 6, 2, 3, 3)
    lw, uw = with_degenerate_cones(lw, uw)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = cones.cone_pair_statistics(lw, lb, uw, ub, 2, plane, device="cpu", memory_mb=memory_mb)
    finally:
        torch.set_num_threads(before)
    assert_matches_oracle(fast, oracle(lw, lb, uw, ub, 2, plane))
    assert fast.n_degenerate > 0 and np.isfinite(fast.rotation).any()
    (plan,) = plans
    if path.startswith("whole"):
        assert plan.tile_o > 1 and plan.tile_p == 5
    elif path.startswith("several"):
        assert plan.tile_o == 1 and 5 % plan.tile_p and plan.p_step == 5
    elif path.startswith("one predecessor"):
        assert plan.tile_p == 1 and plan.f_step < 3
    elif path == "GPU plan: one tile per block":
        assert (plan.o_step, plan.p_step, plan.f_step, plan.tile_o, plan.tile_p) == (8, 5, 3, 8, 5)
    else:
        assert plan.p_step < 5 and plan.tile_p == plan.p_step


def test_undefined_rotations_inside_a_tile_are_left_out():
    # constant lower kernels that fill the plane have v_perp = 0: NaN inside the matmul tiles
    rng = np.random.default_rng(3)
    lw, lb, uw, ub = random_pair(rng, 4, 3, 4, 1, 3, 3)
    lw[1, 2] = 1.0
    lw[3, 0] = -2.0
    fast = cones.cone_pair_statistics(lw, lb, uw, ub, 1, (3, 3), device="cpu")
    assert_matches_oracle(fast, oracle(lw, lb, uw, ub, 1, (3, 3)))
    assert np.isfinite(fast.rotation).all()


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_sorted_prefix_sums_equal_the_direct_sums(offset):
    rng = np.random.default_rng(5)
    lower = offset + rng.standard_normal((6, 9))
    lower[2, 4:] = lower[2, 3]  # ties among the lower values
    upper = offset + 3 * rng.standard_normal((6, 7))
    upper[0, :3] = lower[0, :3]  # upper values equal to lower ones
    upper[4, 0], upper[4, 1] = lower[4].min() - 5, lower[4].max() + 5  # outside the lower range
    got = cones._abs_difference_sums(torch.as_tensor(upper), torch.as_tensor(lower)).numpy()
    want = [[math.fsum(abs(u - v) for v in lower[o]) for u in upper[o]] for o in range(6)]
    scale = np.abs(upper[:, :, None] - lower[:, None, :]).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14 * scale * lower.shape[1])


@pytest.mark.parametrize("upper_kernel, lower_kernel, plane", [
    ((3, 3), (3, 3), (8, 8)), ((3, 3), (3, 3), (4, 4)), ((3, 2), (2, 3), (3, 5)), ((1, 1), (3, 3), (4, 4))])
def test_selector_lists_the_entries_each_shift_brings_together(upper_kernel, lower_kernel, plane):
    """``<shift_j emb(u), emb(v)>`` by ``np.roll`` equals ``u . (v @ S)[j]`` at every candidate shift."""
    rng = np.random.default_rng(7)
    u, v = rng.standard_normal(upper_kernel), rng.standard_normal(lower_kernel)

    def emb(x):
        out = np.zeros(plane)
        out[:x.shape[0], :x.shape[1]] = x
        return out.ravel()

    shifts, has_zero = cones.candidate_shifts(upper_kernel, lower_kernel, plane)
    picked = (v.ravel() @ cones.shift_selector(upper_kernel, lower_kernel, plane, shifts)).reshape(len(shifts), -1)
    rolled = np.array([np.dot(np.roll(emb(u), j), emb(v)) for j in range(plane[0] * plane[1])])
    np.testing.assert_allclose(picked @ u.ravel(), rolled[shifts], rtol=0, atol=1e-12)
    others = np.delete(rolled, shifts)
    assert has_zero == (others.size > 0) and not others.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("memory_mb", [512, 1e-3])
def test_cuda_path_matches_oracle(memory_mb):
    rng = np.random.default_rng(17)
    lw, lb, uw, ub = random_pair(rng, 8, 5, 6, 2, 3, 3)
    lw, uw = with_degenerate_cones(lw, uw)
    for plane in ((8, 8), (4, 4)):
        gpu = cones.cone_pair_statistics(lw, lb, uw, ub, 2, plane, device="cuda", memory_mb=memory_mb)
        assert_matches_oracle(gpu, oracle(lw, lb, uw, ub, 2, plane))
