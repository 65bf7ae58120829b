"""BatchNorm folding (docs/statistics.md §0): the folded layer computes conv + BN in eval mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hpa
from hpa.fold import fold_batchnorm


def randomise_bn(bn: nn.BatchNorm2d | nn.BatchNorm1d, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.randn(n, generator=g))  # includes negative gammas
        bn.weight[0] = -abs(bn.weight[0]) - 0.5
        bn.bias.copy_(torch.randn(n, generator=g))
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) + 0.1)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_folded_conv_equals_conv_then_bn(bias, groups):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=bias, groups=groups), nn.BatchNorm2d(6, eps=1e-3))
    randomise_bn(model[1], 1)
    model.eval()
    layer = hpa.load(model, input_size=(4, 7, 7))["0"]
    assert layer.bn_folded
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    folded = F.conv2d(x, torch.from_numpy(layer.weight), torch.from_numpy(layer.bias), padding=1, groups=groups)
    expected = model.double()(x)
    torch.testing.assert_close(folded, expected, rtol=1e-10, atol=1e-10)


def test_negative_gamma_flips_the_cosine():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, -1.0, 2.0, -0.5]))
    raw = hpa.scan(model, input_size=(3, 8, 8), fold_bn=False).statistics["projection"].layers["0"]["cosines"]
    folded = hpa.scan(model, input_size=(3, 8, 8)).statistics["projection"].layers["0"]["cosines"]
    assert np.sign(folded).tolist() == (np.sign(raw) * np.array([1, -1, 1, -1])).tolist()


def test_transposed_conv_and_linear_fold():
    torch.manual_seed(3)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), nn.Flatten(),
                          nn.Linear(6 * 7 * 7, 5), nn.BatchNorm1d(5))
    randomise_bn(model[1], 4)
    randomise_bn(model[4], 5)
    model.eval().double()
    graph = hpa.load(model, input_size=(4, 5, 5))
    deconv, linear = graph["0"], graph["3"]
    assert deconv.bn_folded and linear.bn_folded
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    got = F.conv_transpose2d(x, torch.from_numpy(deconv.weight), torch.from_numpy(deconv.bias), groups=2)
    torch.testing.assert_close(got, model[:2](x), rtol=1e-10, atol=1e-10)
    h = torch.randn(3, 6 * 7 * 7, dtype=torch.float64)
    got = F.linear(h, torch.from_numpy(linear.weight), torch.from_numpy(linear.bias))
    torch.testing.assert_close(got, model[3:](h), rtol=1e-10, atol=1e-10)


def test_fold_formula_by_hand():
    w = np.array([[1.0, 2.0]])
    weight, bias = fold_batchnorm(w, np.array([0.5]), mean=np.array([2.0]), var=np.array([3.0]),
                                  gamma=np.array([-2.0]), beta=np.array([1.0]), eps=1.0)
    s = -2.0 / 2.0
    np.testing.assert_allclose(weight, [[s * 1.0, s * 2.0]])
    np.testing.assert_allclose(bias, [(0.5 - 2.0) * s + 1.0])
