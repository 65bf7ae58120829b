"""The cone statistics (docs/statistics.md §2) against a slow oracle written straight from the spec."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import hpa
from hpa import cones
from hpa.errors import OptionError
from hpa.graph import ConvGraph, Layer
from hpa.nn import ChannelReLUConv2d

STATE_CODE = {name: code for code, name in enumerate(cones.STATES)}


# -- the oracle ---------------------------------------------------------------------------------

def oracle(lower_w, lower_b, upper_w, upper_b, groups, plane, lower_dilation=(1, 1), upper_dilation=(1, 1)):
    """Per-cone (state, mean |d|/max|d|, mean |delta|, mean rho), one Python loop per pair.

    Each kernel is embedded in the D-dimensional plane (a dilated kernel with its
    taps ``dilation`` apart, as the conv applies it); apexes and openings come
    from their formulas; the rotation is minimised over all D cyclic shifts with
    ``np.roll``.  Degenerate cones get state -1 and NaN statistics.
    """
    height, width = plane
    size = height * width

    def embedder(dilation):
        def emb(x):
            plane_ = np.zeros((height, width))
            plane_[:(x.shape[0] - 1) * dilation[0] + 1:dilation[0], :(x.shape[1] - 1) * dilation[1] + 1:dilation[1]] = x
            return plane_.ravel()
        return emb

    emb_up, emb_low = embedder(upper_dilation), embedder(lower_dilation)

    def apex(e, beta):
        return -beta / e.sum()

    def opening(e):
        return math.asin(abs(e.sum()) / (np.linalg.norm(e) * math.sqrt(size)))

    def angle(a, b):
        return math.acos(max(-1.0, min(1.0, float(np.dot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)))))

    f_up, per_group_up = upper_w.shape[:2]
    per_group_low = lower_w.shape[1]
    per_filter = f_up // groups
    states = np.full((f_up, per_group_up), -1)
    found = {}
    for i in range(f_up):
        for o_local in range(per_group_up):
            o = (i // per_filter) * per_group_up + o_local  # the global channel of a grouped conv
            eu = emb_up(upper_w[i, o_local])
            predecessors = [emb_low(lower_w[o, p]) for p in range(per_group_low)]
            if eu.sum() == 0 or not eu.any() or any(ev.sum() == 0 or not ev.any() for ev in predecessors):
                continue
            u_perp = eu - eu.mean()
            rolls = [np.roll(u_perp, j) for j in range(size)]
            d, delta, rho = [], [], []
            for p, ev in enumerate(predecessors):
                d.append((apex(eu, upper_b[i, o_local]) - apex(ev, lower_b[o, p])) * math.sqrt(size) / size)
                delta.append(2 / math.pi * (opening(eu) - opening(ev)))
                v_perp = ev - ev.mean()
                if not u_perp.any() or not v_perp.any():
                    rho.append(math.nan)
                    continue
                rho.append(min(angle(r, v_perp) for r in rolls) / math.pi)
            big_a, big_delta = max(d), min(delta)
            if big_a >= 0:
                states[i, o_local] = STATE_CODE["OUT_FULL_IN"] if big_delta <= 0 else STATE_CODE["OUT_PARTIAL_IN"]
            else:
                states[i, o_local] = STATE_CODE["IN_FULL_OUT"] if big_delta >= 0 else STATE_CODE["IN_PARTIAL_OUT"]
            found[i, o_local] = (d, delta, rho)
    largest = max((abs(x) for d, _, _ in found.values() for x in d), default=0.0)
    distance, open_, rotation = (np.full(states.shape, np.nan) for _ in range(3))
    for (i, o_local), (d, delta, rho) in found.items():
        distance[i, o_local] = np.mean(np.abs(d)) / largest if largest > 0 else 0.0
        open_[i, o_local] = np.mean(np.abs(delta))
        defined = [r for r in rho if not math.isnan(r)]
        rotation[i, o_local] = np.mean(defined) if defined else np.nan
    return states, distance, open_, rotation


def assert_matches_oracle(fast, expected):
    states, distance, open_, rotation = expected
    np.testing.assert_array_equal(fast.states, states)
    for got, want in ((fast.distance, distance), (fast.opening, open_), (fast.rotation, rotation)):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9, equal_nan=True)


def random_pair(rng, f_low, c_low, f_up, groups, k_low, k_up, bias_scale=0.1):
    lower_w = rng.standard_normal((f_low, c_low, k_low, k_low))
    upper_w = rng.standard_normal((f_up, f_low // groups, k_up, k_up))
    lower_b = bias_scale * rng.standard_normal((f_low, c_low))
    upper_b = bias_scale * rng.standard_normal((f_up, f_low // groups))
    return lower_w, lower_b, upper_w, upper_b


# -- everything from the torch module and the spec, nothing from hpa.cones -----------------------------

def module_kernels(module: nn.Module):
    """``(weight, biases, dilation, groups, rule)`` of a conv, read from the torch module.

    Biases per single-channel kernel (docs/statistics.md §2 "Biases"): the channel-wise-ReLU
    conv's own per-channel biases, otherwise the filter bias split evenly, ``b / C_g``.
    """
    weight = module.weight.detach().double().numpy()
    filters, per_group = weight.shape[:2]
    if isinstance(module, ChannelReLUConv2d):
        return weight, module.bias.detach().double().numpy(), tuple(module.dilation), 1, "per-channel"
    bias = np.zeros(filters) if module.bias is None else module.bias.detach().double().numpy()
    biases = np.array([[bias[f] / per_group] * per_group for f in range(filters)])
    return weight, biases, tuple(module.dilation), module.groups, "split"


def input_planes(model: nn.Module, input_size) -> dict[str, tuple[int, int]]:
    """The (H, W) each conv of ``model`` reads, from a real forward pass."""
    planes, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, ChannelReLUConv2d)):
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: planes.__setitem__(name, tuple(args[0].shape[2:]))))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size))
    finally:
        for hook in hooks:
            hook.remove()
    return planes


def spread(weight, dilation):
    """The kernel a dilated conv applies, written out for the fast function's array interface."""
    k1, k2 = weight.shape[2:]
    out = np.zeros(weight.shape[:2] + ((k1 - 1) * dilation[0] + 1, (k2 - 1) * dilation[1] + 1))
    for a in range(k1):
        for b in range(k2):
            out[:, :, a * dilation[0], b * dilation[1]] = weight[:, :, a, b]
    return out


def module_oracle(lower: nn.Module, upper: nn.Module, plane):
    lw, lb, ld, _, _ = module_kernels(lower)
    uw, ub, ud, groups, _ = module_kernels(upper)
    return oracle(lw, lb, uw, ub, groups, plane, lower_dilation=ld, upper_dilation=ud)


def check_scan_against_modules(model: nn.Module, input_size, entries):
    """Each pair's JSON entry (and the fast per-cone values) against the oracle fed from the modules."""
    assert entries, "no eligible pairs"
    planes = input_planes(model, input_size)
    for entry in entries:
        lower, upper = model.get_submodule(entry["lower"]), model.get_submodule(entry["upper"])
        plane = planes[entry["upper"]]
        assert planes[entry["lower"]] == plane and tuple(entry["plane"]) == plane
        lw, lb, ld, _, low_rule = module_kernels(lower)
        uw, ub, ud, groups, up_rule = module_kernels(upper)
        assert entry["bias_rule"] == (low_rule if low_rule == up_rule else f"lower {low_rule}, upper {up_rule}")
        want = oracle(lw, lb, uw, ub, groups, plane, lower_dilation=ld, upper_dilation=ud)
        fast = cones.cone_pair_statistics(spread(lw, ld), lb, spread(uw, ud), ub, groups, plane, device="cpu")
        assert_matches_oracle(fast, want)
        states = want[0]
        live = states >= 0
        assert entry["n_cones"] == states.size and entry["degenerate"] == int((~live).sum())
        for name, code in STATE_CODE.items():
            assert entry["states"][name] == int((states == code).sum())
            assert entry["fractions"][name] == pytest.approx((states == code).sum() / live.sum())
        for key, values in zip(("distance", "opening", "rotation"), want[1:]):
            values = values[np.isfinite(values)]
            assert entry[key]["mean"] == pytest.approx(values.mean(), abs=1e-9)
            assert entry[key]["std"] == pytest.approx(values.std(), abs=1e-9)


# -- the fast implementation agrees with the oracle ------------------------------------------------

@pytest.mark.parametrize("f_low, c_low, f_up, groups, k_low, k_up, plane", [
    (5, 3, 4, 1, 3, 3, (8, 8)),  # H, W >= 2k-1: cross-correlation plus zero
    (4, 2, 6, 2, 3, 3, (5, 5)),  # exactly 2k-1: every shift overlaps, no zero
    (4, 3, 4, 1, 3, 3, (3, 4)),  # planes smaller than 2k-1
    (6, 2, 6, 3, 5, 3, (7, 9)),  # grouped, different kernel sizes, non-square plane
    (4, 2, 8, 4, 3, 2, (4, 3)),  # depthwise-like upper, even kernel, tiny plane
    (3, 1, 3, 3, 3, 3, (3, 3)),  # kernel fills the plane
    (4, 4, 2, 1, 1, 3, (6, 5)),  # 1x1 lower kernels
])
def test_random_pairs_match_oracle(f_low, c_low, f_up, groups, k_low, k_up, plane):
    rng = np.random.default_rng(f_low * 100 + k_low * 10 + plane[0])
    lw, lb, uw, ub = random_pair(rng, f_low, c_low, f_up, groups, k_low, k_up)
    fast = cones.cone_pair_statistics(lw, lb, uw, ub, groups, plane, device="cpu")
    assert_matches_oracle(fast, oracle(lw, lb, uw, ub, groups, plane))
    assert len(set(fast.states.ravel().tolist())) > 1  # the case is not trivially one state


@pytest.mark.parametrize("memory_mb", [1e-4, 0.01, 0.05])  # blocks split filters, predecessors, lower filters
def test_chunking_does_not_change_results(memory_mb):
    rng = np.random.default_rng(3)
    lw, lb, uw, ub = random_pair(rng, 12, 5, 10, 2, 3, 3)
    whole = cones.cone_pair_statistics(lw, lb, uw, ub, 2, (6, 6), device="cpu", memory_mb=512)
    tiny = cones.cone_pair_statistics(lw, lb, uw, ub, 2, (6, 6), device="cpu", memory_mb=memory_mb)
    np.testing.assert_array_equal(whole.states, tiny.states)
    for a, b in ((whole.distance, tiny.distance), (whole.opening, tiny.opening), (whole.rotation, tiny.rotation)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def random_network():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.LeakyReLU(0.1), nn.Dropout(0.2),
        nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU(),  # depthwise
        nn.Conv2d(6, 5, 5, padding=2), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(5, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1),
    )


def test_random_network_matches_oracle():
    model = random_network()
    result = hpa.scan(model, statistics=["cones"], input_size=(3, 12, 12))
    entries = result.to_dict()["pairs"]
    assert [(e["lower"], e["upper"]) for e in entries] == [("0", "2"), ("2", "5"), ("5", "7"), ("10", "12")]
    assert {e["bias_rule"] for e in entries} == {"split"}
    check_scan_against_modules(model, (3, 12, 12), entries)


def tiny_channel_relu_net():
    return nn.Sequential(
        ChannelReLUConv2d(3, 4, 3, padding=1), ChannelReLUConv2d(4, 4, 3, padding=1),
        nn.MaxPool2d(2),
        ChannelReLUConv2d(4, 5, 3, padding=1), ChannelReLUConv2d(5, 3, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2),
    )


def tiny_plain_net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 3, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2),
    )


def train_a_little(model, steps=30, size=10):
    torch.manual_seed(1)
    x = torch.randn(64, 3, size, size)
    y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model


@pytest.mark.parametrize("build, rule, size", [
    (tiny_channel_relu_net, "per-channel", 8),  # the second pair runs on 4x4, smaller than 2k-1
    (tiny_plain_net, "split", 10),
])
def test_trained_networks_match_oracle(build, rule, size):
    torch.manual_seed(0)
    model = train_a_little(build(), size=size)
    result = hpa.scan(model, statistics=["cones"], input_size=(3, size, size))
    entries = result.to_dict()["pairs"]
    assert len(entries) == 2 and {e["bias_rule"] for e in entries} == {rule}
    assert entries[1]["plane"] == [size // 2, size // 2]
    check_scan_against_modules(model, (3, size, size), entries)
    # training moved the biases off zero, so apexes differ and distances are not all zero
    assert any(e["distance"]["mean"] > 0 for e in entries)


def test_split_biases_add_up_to_the_filter_bias():
    w = np.ones((3, 4, 3, 3))
    biases, rule = cones.channel_biases(w, np.array([4.0, -8.0, 2.0]))
    assert rule == "split"
    np.testing.assert_allclose(biases.sum(1), [4.0, -8.0, 2.0])
    np.testing.assert_allclose(biases[:, 0], [1.0, -2.0, 0.5])
    per_channel = np.arange(12.0).reshape(3, 4)
    assert cones.channel_biases(w, np.zeros(3), per_channel)[1] == "per-channel"
    np.testing.assert_array_equal(cones.channel_biases(w, None, per_channel)[0], per_channel)


# -- geometric facts of the spec -------------------------------------------------------------------

def test_states_do_not_depend_on_the_plane():
    rng = np.random.default_rng(7)
    lw, lb, uw, ub = random_pair(rng, 8, 4, 8, 1, 3, 3, bias_scale=1.0)
    reference = cones.cone_pair_statistics(lw, lb, uw, ub, 1, None, device="cpu").states
    assert len(set(reference.ravel().tolist())) == 4  # all four states occur
    for plane in ((3, 3), (5, 5), (8, 8), (13, 7), (32, 32)):
        got = cones.cone_pair_statistics(lw, lb, uw, ub, 1, plane, device="cpu")
        np.testing.assert_array_equal(got.states, reference)
    # and the oracle, which uses D, agrees for two of them
    for plane in ((3, 3), (6, 9)):
        np.testing.assert_array_equal(oracle(lw, lb, uw, ub, 1, plane)[0], reference)


def test_without_a_plane_only_states_and_distances():
    rng = np.random.default_rng(8)
    lw, lb, uw, ub = random_pair(rng, 4, 3, 4, 1, 3, 3)
    free = cones.cone_pair_statistics(lw, lb, uw, ub, 1, None, device="cpu")
    with_plane = cones.cone_pair_statistics(lw, lb, uw, ub, 1, (6, 6), device="cpu")
    assert free.opening is None and free.rotation is None and free.max_distance is None
    np.testing.assert_allclose(free.distance, with_plane.distance, atol=1e-12)  # D cancels in the normalised |d|


def _place(kernels, size, offset):
    out = np.zeros(kernels.shape[:2] + (size, size))
    out[:, :, offset[0]:offset[0] + kernels.shape[2], offset[1]:offset[1] + kernels.shape[3]] = kernels
    return out


@pytest.mark.parametrize("offset", [(1, 2), (2, 0), (0, 1)])
def test_rotation_invariant_under_a_common_cyclic_shift(offset):
    """Moving both kernels by the same offset in the plane shifts both normals by the same j."""
    rng = np.random.default_rng(9)
    lw, lb, uw, ub = random_pair(rng, 5, 3, 4, 1, 3, 3)
    plane = (9, 8)
    base = cones.cone_pair_statistics(lw, lb, uw, ub, 1, plane, device="cpu")
    moved = cones.cone_pair_statistics(_place(lw, 5, offset), lb, _place(uw, 5, offset), ub, 1, plane,
                                       device="cpu")
    np.testing.assert_allclose(moved.rotation, base.rotation, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(moved.states, base.states)


def test_rotation_invariant_under_positive_rescaling():
    rng = np.random.default_rng(10)
    lw, lb, uw, ub = random_pair(rng, 6, 3, 5, 1, 3, 3)
    base = cones.cone_pair_statistics(lw, lb, uw, ub, 1, (7, 7), device="cpu")
    scale_up = rng.uniform(0.1, 10.0, size=uw.shape[:2])[..., None, None]
    scale_low = rng.uniform(0.1, 10.0, size=lw.shape[:2])[..., None, None]
    for new_lw, new_uw in ((lw, uw * scale_up), (lw * scale_low, uw), (lw * 1e3, uw * 1e-3)):
        got = cones.cone_pair_statistics(new_lw, lb, new_uw, ub, 1, (7, 7), device="cpu")
        np.testing.assert_allclose(got.rotation, base.rotation, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got.opening, base.opening, rtol=0, atol=1e-12)


def test_rotation_of_a_kernel_with_its_own_shift_is_zero():
    rng = np.random.default_rng(11)
    kernel = rng.standard_normal((3, 3))
    lower = np.zeros((1, 1, 4, 4))
    lower[0, 0, 1:, 1:] = kernel  # the same kernel, shifted by (1, 1)
    upper = kernel[None, None]
    got = cones.cone_pair_statistics(lower, np.zeros((1, 1)), upper, np.zeros((1, 1)), 1, (8, 8), device="cpu")
    assert got.rotation[0, 0] == pytest.approx(0.0, abs=1e-7)


# -- degenerate and ineligible cases ---------------------------------------------------------------

def test_degenerate_cones_are_counted_not_crashed():
    rng = np.random.default_rng(12)
    lw, lb, uw, ub = random_pair(rng, 4, 3, 5, 1, 3, 3)
    uw[0, 1] = [[1, -1, 0], [0, 2, -2], [0, 0, 0]]  # zero-sum u: cone (0, 1)
    uw[2, 3] = 0.0  # all-zero u: cone (2, 3)
    lw[2, 1] = [[1, 1, 1], [0, 0, 0], [-1, -1, -1]]  # zero-sum predecessor: every cone (i, 2)
    fast = cones.cone_pair_statistics(lw, lb, uw, ub, 1, (6, 6), device="cpu")
    want = oracle(lw, lb, uw, ub, 1, (6, 6))
    assert_matches_oracle(fast, want)
    degenerate = fast.states == cones.DEGENERATE
    assert degenerate[0, 1] and degenerate[2, 3] and degenerate[:, 2].all()
    assert fast.n_degenerate == 5 + 2
    summary = cones.summarize(fast)
    assert summary["degenerate"] == 7 and sum(summary["states"].values()) == 20 - 7
    assert sum(summary["fractions"].values()) == pytest.approx(1.0)


def test_all_cones_degenerate():
    lw = np.zeros((2, 2, 3, 3))
    uw = np.ones((2, 2, 3, 3))
    fast = cones.cone_pair_statistics(lw, np.zeros((2, 2)), uw, np.zeros((2, 2)), 1, (5, 5), device="cpu")
    summary = cones.summarize(fast)
    assert summary["degenerate"] == 4 and set(summary["fractions"].values()) == {None}
    assert summary["rotation"] == {"mean": None, "std": None}


def test_undefined_rotation_when_a_kernel_fills_the_plane_evenly():
    # a constant kernel that fills the plane has x_perp = 0: no rotation, but a state
    lw = np.ones((1, 2, 3, 3))
    lw[0, 1] = np.array([[3.0, 1, 4], [1, 5, 9], [2, 6, 5]])
    uw = np.arange(9.0).reshape(1, 1, 3, 3) - 2
    fast = cones.cone_pair_statistics(lw, np.ones((1, 2)), uw, np.ones((1, 1)), 1, (3, 3), device="cpu")
    assert_matches_oracle(fast, oracle(lw, np.ones((1, 2)), uw, np.ones((1, 1)), 1, (3, 3)))
    assert np.isfinite(fast.rotation).all()  # the mean over the one defined predecessor


def skipped_reasons(result):
    return {s["name"]: s["reason"] for s in result.to_dict()["skipped"] if s.get("statistic") == "cones"}


def test_ineligible_pairs_are_listed_with_reasons():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.ReLU(),  # stride > 1
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),  # pooling between
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3),  # valid padding: changes the plane for a following conv
        nn.Conv2d(4, 4, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),  # 1x1 plane: kernel larger than the plane
        nn.Conv2d(4, 4, 3, padding=1),
    )
    result = hpa.scan(model, statistics=["cones"], input_size=(3, 16, 16))
    reasons = skipped_reasons(result)
    pairs = [(e["lower"], e["upper"]) for e in result.to_dict()["pairs"]]
    assert pairs == [("7", "9")]
    assert "stride 2" in reasons["0 -> 2"] and "stride 2" in reasons["2 -> 4"]
    assert "has stride 2x2 (cone pairs need stride 1)" in reasons["0 -> 2"]
    assert "max_pool2d" in reasons["4 -> 7"] and "not element-wise" in reasons["4 -> 7"]
    assert "(cone pairs need both convs on the same plane)" in reasons["9 -> 10"]
    assert "larger than the 1x1 plane" in reasons["12 -> 14"]
    for alone in ("0", "2", "4", "10", "12", "14"):
        assert alone in reasons, alone
    json.loads(result.to_json())  # strict JSON


def test_other_connections_are_not_pairs():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = torch.relu(self.a(x))
            z = self.b(y)
            return self.c(torch.relu(self.bn(z)) + y)

    model = Branches().eval()
    result = hpa.scan(model, statistics=["cones"], input_size=(3, 8, 8))
    assert [(e["lower"], e["upper"]) for e in result.to_dict()["pairs"]] == [("a", "b")]
    assert "reads 2 tensors" in skipped_reasons(result)["c"] and "not one conv" in skipped_reasons(result)["c"]
    # without folding, the BatchNorm sits between a and b's successor chain and is named
    unfolded = hpa.scan(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4).eval(),
                                      nn.Conv2d(4, 4, 3, padding=1)).eval(),
                        statistics=["cones"], input_size=(3, 8, 8), fold_bn=False)
    assert "batch_norm" in skipped_reasons(unfolded)["0 -> 2"]


def test_graph_without_shapes_gives_states_only():
    rng = np.random.default_rng(13)
    lw, lb, uw, ub = random_pair(rng, 4, 3, 4, 1, 3, 3)
    low = Layer("low", 0, "conv2d", lw, bias=lb.sum(1), stride=(1, 1), padding=((1, 1), (1, 1)),
                dilation=(1, 1), predecessors=("input",), via={"input": ()})
    up = Layer("up", 1, "conv2d", uw, bias=ub.sum(1), stride=(1, 1), padding=((1, 1), (1, 1)),
               dilation=(1, 1), predecessors=("low",), via={"low": ("relu",)})
    graph = ConvGraph([low, up])
    entry = hpa.scan(graph, statistics=["cones"]).to_dict()["pairs"][0]
    assert entry["plane"] is None and entry["rotation"]["mean"] is None and entry["opening"]["mean"] is None
    assert sum(entry["states"].values()) == 16
    # with --input-size (the scan's "input_size" option) the plane is known again
    from hpa.plugins import registries
    from hpa.registry import StatisticContext

    statistic = registries()["statistics"].get("cones")
    for size in ((3, 6, 6), "3,6,6"):
        entry = statistic.compute(graph, StatisticContext(options={"input_size": size})).extra["pairs"][0]
        assert entry["plane"] == [6, 6] and entry["rotation"]["mean"] is not None
    # a bare graph with no connectivity cannot pair anything
    bare = ConvGraph([Layer("a", 0, "conv2d", lw, stride=None), Layer("b", 1, "conv2d", uw, stride=None)])
    result = hpa.scan(bare, statistics=["cones"])
    assert result.to_dict()["pairs"] == [] and "its input is unknown" in skipped_reasons(result)["b"]


def test_dilated_convs_use_the_dilated_kernel():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1))
    result = hpa.scan(model, statistics=["cones"], input_size=(2, 7, 7))
    check_scan_against_modules(model, (2, 7, 7), result.to_dict()["pairs"])


# -- the plugin surface --------------------------------------------------------------------------------

def test_scan_outputs(tmp_path):
    model = train_a_little(tiny_channel_relu_net(), steps=5)
    result = hpa.scan(model, statistics=["cones"], input_size=(3, 10, 10), compare_init=True)
    data = json.loads(result.to_json())
    entry = data["pairs"][0]
    assert set(entry) >= {"lower", "upper", "n_cones", "degenerate", "bias_rule", "states", "fractions",
                          "distance", "opening", "rotation", "init"}
    assert set(entry["states"]) == set(cones.STATES) and set(entry["rotation"]) == {"mean", "std"}
    assert entry["init"]["n_cones"] == entry["n_cones"]
    files = {p.name for p in result.write(tmp_path)}
    assert {"pairs.csv", "cones_states.png", "cones_distributions.png"} <= files
    header = (tmp_path / "pairs.csv").read_text().splitlines()[0]
    assert "states.OUT_FULL_IN" in header and "init.rotation.mean" in header
    from hpa.plugins import registries

    text = registries()["statistics"].get("cones").report(result)
    assert "0 -> 1" in text and "(init)" in text


def test_device_option():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    base = hpa.scan(model, statistics=["cones"], input_size=(1, 6, 6), cones_device="cpu",
                    cones_memory_mb="0.001", cones_rotation="true").to_dict()["pairs"]
    assert base[0]["rotation"]["mean"] is not None
    skipped = hpa.scan(model, statistics=["cones"], input_size=(1, 6, 6),
                       cones_rotation="false").to_dict()["pairs"]
    assert skipped[0]["rotation"]["mean"] is None and skipped[0]["states"] == base[0]["states"]
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="cuda"):
            hpa.scan(model, statistics=["cones"], input_size=(1, 6, 6), cones_device="cuda")
    with pytest.raises(OptionError):
        hpa.scan(model, statistics=["cones"], input_size=(1, 6, 6), cones_device="tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(14)
    lw, lb, uw, ub = random_pair(rng, 16, 8, 12, 2, 3, 3)
    cpu = cones.cone_pair_statistics(lw, lb, uw, ub, 2, (8, 8), device="cpu")
    gpu = cones.cone_pair_statistics(lw, lb, uw, ub, 2, (8, 8), device="cuda")
    np.testing.assert_array_equal(cpu.states, gpu.states)
    np.testing.assert_allclose(cpu.rotation, gpu.rotation, atol=1e-12)
