"""Exact ties and boundaries of every comparison in docs/statistics.md.

Each case is built from small integers (or values whose float32 sum is exactly
zero), so the tie holds exactly in float64 and the spec alone decides the
outcome.  Expected values are written from the spec, never from hpa's output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import hpa
from hpa import cones
from hpa.graph import ConvGraph, Layer
from hpa.registry import StatisticContext
from hpa_plugins import projection
from test_cones import STATE_CODE, check_scan_against_modules, module_oracle

OFI, IFO, OPI, IPO = (STATE_CODE[name] for name in ("OUT_FULL_IN", "IN_FULL_OUT", "OUT_PARTIAL_IN",
                                                    "IN_PARTIAL_OUT"))


def run_projection(*layers, **options):
    return projection.compute(ConvGraph(list(layers)), StatisticContext(options={"bins": 40, **options}))


# -- projection: c_i = 0 --------------------------------------------------------------------------

def test_zero_sum_filters_count_as_negative():
    """§1: ``n_l = (1/F') * #{ i : c_i <= 0 }``: a filter summing to exactly 0 counts."""
    antisymmetric = np.array([[1, 2, 0], [3, 0, -3], [0, -2, -1]])  # k = -k rotated by 180 degrees
    assert (antisymmetric == -antisymmetric[::-1, ::-1]).all()
    w = np.stack([
        np.stack([antisymmetric, antisymmetric]),  # sum 0
        np.stack([[[1, -1, 0]] * 3, [[0, 1, -1]] * 3]),  # [1, -1] patterns: sum 0
        np.ones((2, 3, 3)),  # positive
        -np.ones((2, 3, 3)),  # negative
        np.full((2, 3, 3), 0.1),  # positive, float32 below
    ]).astype(np.float32)
    w[4, 0, 0, :2] = [0.1, -0.1]  # still positive overall
    assert np.float64(w[0]).sum() == 0 and np.float64(w[1]).sum() == 0
    values = run_projection(Layer(name="c", index=0, kind="conv2d", weight=w)).layers["c"]
    assert values["cosines"][0] == 0.0 and values["cosines"][1] == 0.0
    assert values["n_l"] == 3 / 5  # two ties and one negative filter


def test_exactly_zero_float32_filter_bank():
    """§1: ``c_i <= 0`` for filters that cancel exactly in float32, as a fixed filter bank does."""
    rng = np.random.default_rng(0)
    half = rng.standard_normal((6, 1, 4)).astype(np.float32)
    w = np.concatenate([half, -half[:, :, ::-1]], axis=2)  # each filter sums to exactly zero
    assert (w.astype(np.float64).sum(axis=(1, 2)) == 0).all()
    values = run_projection(Layer(name="bank", index=0, kind="conv1d", weight=w)).layers["bank"]
    assert values["n_l"] == 1.0 and values["cosines"] == [0.0] * 6


# -- cones: the state table --------------------------------------------------------------------------

# One lower filter with two predecessors; every upper filter reads its channel.
V0 = [[1, 0, 0], [0, 2, 0], [0, 0, 1]]  # s = 4, |s|/||x|| = 4/sqrt(6): the largest ratio
V1 = [[1, 1, 0], [0, 0, 0], [0, 0, -1]]  # s = 1
LOWER_BIASES = [-4.0, -3.0]  # apices a(v0) = 1, a(v1) = 3: min_p a(v_p) = 1
PERMUTED = [[0, 0, 1], [0, 2, 0], [1, 0, 0]]  # a permutation of V0: Delta = 0 exactly
SHARPER = [[2] * 3] * 3  # s = 18, ratio 3 > 4/sqrt(6): Delta > 0
FLATTER = [[1, 0, 0], [0, 0, 0], [0, 0, -2]]  # s = -1, ratio 1/sqrt(5): Delta < 0
# (kernel, bias, expected state): a(u) = -bias / s(u) against min_p a(v_p) = 1
UPPER = [
    (PERMUTED, -4.0, OFI),  # A = 0, Delta = 0
    (PERMUTED, -8.0, OFI),  # A > 0, Delta = 0
    (PERMUTED, -2.0, IFO),  # A < 0, Delta = 0
    (FLATTER, 1.0, OFI),  # A = 0, Delta < 0
    (SHARPER, -18.0, OPI),  # A = 0, Delta > 0
    (SHARPER, -9.0, IFO),  # A < 0, Delta > 0
    (FLATTER, 2.0, OFI),  # A > 0, Delta < 0
    (FLATTER, 0.5, IPO),  # A < 0, Delta < 0
]


def tie_pair():
    lower_w = np.array([[V0, V1]], np.float64)
    lower_b = np.array([LOWER_BIASES])
    upper_w = np.array([[kernel] for kernel, _, _ in UPPER], np.float64)
    upper_b = np.array([[bias] for _, bias, _ in UPPER])
    expected = np.array([[state] for _, _, state in UPPER])
    return lower_w, lower_b, upper_w, upper_b, expected


@pytest.mark.parametrize("plane", [None, (3, 3), (7, 5)])
def test_state_boundaries_follow_the_table(plane):
    """§2 "The four discrete states": ``A >= 0 and Delta <= 0 -> OUT_FULL_IN``,
    ``A >= 0 and Delta > 0 -> OUT_PARTIAL_IN``, ``A < 0 and Delta >= 0 -> IN_FULL_OUT``,
    ``A < 0 and Delta < 0 -> IN_PARTIAL_OUT``, with ``A = 0`` and ``Delta = 0`` exact."""
    lower_w, lower_b, upper_w, upper_b, expected = tie_pair()
    got = cones.cone_pair_statistics(lower_w, lower_b, upper_w, upper_b, 1, plane, device="cpu")
    np.testing.assert_array_equal(got.states, expected)


def test_the_ties_are_exact_in_float64():
    """§2: ``a(x) = -beta / s(x)`` and ``alpha(x) = arcsin(|s(x)| / (||x|| sqrt(D)))``: the
    chosen kernels tie exactly, so the state table above is tested at its boundaries."""
    apex = [-b / np.sum(k) for k, b in zip((V0, V1), LOWER_BIASES)]
    assert min(apex) == 1.0
    ratio = [abs(np.sum(k)) / math.sqrt(np.sum(np.square(k))) for k in (V0, V1, PERMUTED)]
    assert ratio[2] == ratio[0] == max(ratio[:2])
    assert [-b / np.sum(k) for k, b, _ in UPPER[:1] + UPPER[3:5]] == [1.0, 1.0, 1.0]


def test_degenerate_zero_sum_cones_get_no_state():
    """§2: "A cone is degenerate when ``s(u) = 0`` or any ``s(v_p) = 0`` (no apex)"."""
    lower_w, lower_b, upper_w, upper_b, _ = tie_pair()
    upper_w[2, 0] = [[1, -1, 0], [0, 0, 0], [0, 0, 0]]  # s(u) = 0
    got = cones.cone_pair_statistics(lower_w, lower_b, upper_w, upper_b, 1, (5, 5), device="cpu")
    assert got.states[2, 0] == cones.DEGENERATE and got.n_degenerate == 1
    lower_w[0, 1] = [[0, 1, 0], [0, 0, 0], [0, -1, 0]]  # s(v_1) = 0: every cone of this lower filter
    got = cones.cone_pair_statistics(lower_w, lower_b, upper_w, upper_b, 1, (5, 5), device="cpu")
    assert (got.states == cones.DEGENERATE).all() and np.isnan(got.distance).all()
    assert cones.summarize(got)["fractions"] == dict.fromkeys(cones.STATES)


# -- cones: the rotation's exact zero -------------------------------------------------------------------

@pytest.mark.parametrize("plane", [(3, 4), (4, 5), (6, 6)])  # D > (2k-1)^2: some shift misses
def test_rotation_maximum_is_the_zero_of_a_non_overlapping_shift(plane):
    """§2 rotation: "When ``H, W >= 2k-1``, those D inner products are the full 2-D
    cross-correlation of the two kernels, plus the value 0 for shifts where the supports do
    not overlap": every overlapping inner product is negative here, so the best is that 0."""
    u = np.array([[1.0, 2.0], [1.0, 1.0]])  # positive
    v = -np.array([[1.0, 2.0], [3.0, 4.0]])  # negative: every overlap has a negative product
    size = plane[0] * plane[1]
    got = cones.cone_pair_statistics(v[None, None], np.ones((1, 1)), u[None, None], np.ones((1, 1)), 1, plane,
                                     device="cpu")

    def perp_norm(x):  # ||emb(x) - mean(emb(x))||, with the D - 4 zeros at -mean
        mean = x.sum() / size
        return math.sqrt(((x - mean) ** 2).sum() + (size - x.size) * mean * mean)

    best_raw = 0.0  # the non-overlapping shifts
    cosine = (best_raw - u.sum() * v.sum() / size) / (perp_norm(u) * perp_norm(v))
    assert got.rotation[0, 0] == pytest.approx(math.acos(cosine) / math.pi, abs=1e-12)


# -- cones through a scan: dilation and non-square planes -------------------------------------------------

def test_dilated_kernels_against_the_module_oracle():
    """§2 single-channel cones: ``emb(x)`` places the kernel the conv really applies, so a
    dilated conv's taps are spread out with zeros between them."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=2, dilation=2), nn.ReLU(),
                          nn.Conv2d(3, 2, (2, 3), padding=(1, 2), dilation=(2, 2)), nn.ReLU(),
                          nn.Conv2d(2, 2, 3, padding=1)).eval()
    result = hpa.scan(model, statistics=["cones"], input_size=(2, 7, 6))
    entries = result.to_dict()["pairs"]
    assert [(e["lower"], e["upper"]) for e in entries] == [("0", "2"), ("2", "4")]
    check_scan_against_modules(model, (2, 7, 6), entries)


def test_non_square_plane_smaller_than_2k_minus_1():
    """§2: "The distances and the rotation need H and W" and ``D = H*W`` with ``emb`` row-major:
    on a 3 x 9 plane (H < 2k-1) a plane read as 9 x 3 gives another rotation."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1)).eval()
    result = hpa.scan(model, statistics=["cones"], input_size=(2, 3, 9))
    [entry] = result.to_dict()["pairs"]
    assert entry["plane"] == [3, 9]
    check_scan_against_modules(model, (2, 3, 9), [entry])
    # the test can see a swapped plane: the oracle on 9 x 3 gives another rotation
    swapped = module_oracle(model[0], model[2], (9, 3))[3]
    assert abs(np.nanmean(swapped) - entry["rotation"]["mean"]) > 1e-6


# -- projection: the fully-connected-conv rule ------------------------------------------------------------

def scan_one_conv(conv: nn.Module, input_size, **options):
    result = hpa.scan(nn.Sequential(conv).eval(), statistics=["projection"], input_size=input_size, **options)
    return result.statistics["projection"]


@pytest.mark.parametrize("conv, input_size, fully_connected", [
    (nn.Conv2d(2, 4, 5, padding=1), (2, 3, 3), True),  # kernel 5 > input 3, padding makes it cover 5
    (nn.Conv2d(2, 4, 3, dilation=2), (2, 5, 5), True),  # dilation spreads 3 taps over 5
    (nn.Conv2d(2, 4, (5, 3), padding=(1, 0), dilation=(1, 2)), (2, 3, 5), True),
    (nn.Conv2d(2, 4, 5, padding=2), (2, 3, 3), False),  # kernel > input, but padding makes a real 3x3 conv
    (nn.Conv2d(2, 4, 3, dilation=2, padding=1), (2, 5, 5), False),  # 3x3 output: a real conv
])
def test_fully_connected_rule_uses_padding_and_dilation(conv, input_size, fully_connected):
    """§1 "Linear layers ... Included only on request": a conv whose (dilated) kernel covers its
    whole padded input, one output position, is a linear layer."""
    with torch.no_grad():
        out = conv(torch.zeros(1, *input_size))
    assert (out.shape[2:] == (1, 1)) == fully_connected  # the torch module decides, not hpa
    stat = scan_one_conv(conv, input_size)
    reasons = {s.name: s.reason for s in stat.skipped}
    if fully_connected:
        assert set(stat.layers) == set() and "fully-connected layer written as a conv" in reasons["0"]
        assert set(scan_one_conv(conv, input_size, with_linear=True).layers) == {"0"}
    else:
        assert set(stat.layers) == {"0"} and reasons == {}
