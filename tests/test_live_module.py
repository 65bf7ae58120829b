"""Reading a live module has no side effects (issue 7 §5).

A training loop that scans as it goes must see no difference: training flags,
random generators, parameters, gradients and ``requires_grad`` come back as
they were, the graph owns its numbers, and the dummy input follows the
module's device and dtype.
"""

from __future__ import annotations

import copy
import random
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hpa
from hpa.backends.torch_trace import trace_module

SIZE = (3, 8, 8)


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(8, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


class StandardisedConv(nn.Conv2d):
    """A conv whose weight is computed in the forward pass, which forces a real (non-meta) trace."""

    def forward(self, x):
        weight = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class DrawsRandomNumbers(nn.Module):
    """Draws from every global generator in its forward pass, as stochastic layers do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        torch.rand(1)
        np.random.rand()
        random.random()
        return F.relu(self.conv(x))


def scan_with_init(model):
    return hpa.scan(model, statistics=["projection"], compare_init=True, input_size=SIZE, seed=3)


READERS = {
    "load": lambda model: hpa.load(model, input_size=SIZE),
    "scan --compare-init": scan_with_init,
}


def draws() -> tuple:
    return torch.rand(4), np.random.rand(4), random.random()


@pytest.mark.parametrize("read", READERS.values(), ids=READERS.keys())
def test_training_flags_come_back_per_submodule(read):
    model = small_net().train()
    model[3].eval()  # a mixed tree: dropout in eval mode, everything else training
    model[1].train()
    flags = [m.training for m in model.modules()]
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    read(model)
    assert [m.training for m in model.modules()] == flags
    for key, value in model.state_dict().items():  # no forward pass in training mode updated BN stats
        torch.testing.assert_close(value, stats[key], rtol=0, atol=0)


@pytest.mark.parametrize("model_fn", [small_net, DrawsRandomNumbers], ids=["small_net", "draws_in_forward"])
@pytest.mark.parametrize("read", READERS.values(), ids=READERS.keys())
def test_every_random_generator_is_untouched(read, model_fn):
    model = model_fn()
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    read(model)
    after = draws()
    torch.set_rng_state(saved[0])
    np.random.set_state(saved[1])
    random.setstate(saved[2])
    expected = draws()  # what the caller would have drawn had hpa never run
    torch.testing.assert_close(after[0], expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(after[1], expected[1])
    assert after[2] == expected[2]


def test_compare_init_is_the_seeded_reset_of_a_copy():
    model = small_net()
    result = scan_with_init(model)
    fresh = copy.deepcopy(model)
    torch.manual_seed(3)  # independently: reset every submodule under the scan's seed
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    np.testing.assert_array_equal(result.init["7"].weight, fresh[7].weight.detach().numpy())
    np.testing.assert_array_equal(result.init["4"].weight, fresh[4].weight.detach().numpy())
    assert not np.array_equal(result.graph["4"].weight, result.init["4"].weight)


def test_graph_weights_do_not_change_when_the_module_trains_on():
    model = small_net()
    graph = hpa.load(model, input_size=SIZE)
    before = {layer.name: (layer.weight.copy(), layer.bias.copy()) for layer in graph}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(-3.0).add_(1.0)
    for layer in graph:
        np.testing.assert_array_equal(layer.weight, before[layer.name][0])
        np.testing.assert_array_equal(layer.bias, before[layer.name][1])
    # ... and the graph was right to begin with: the unfolded layers held the module's numbers.
    assert not np.array_equal(graph["7"].weight, model[7].weight.detach().numpy())


def test_weights_are_copied_once_and_loaders_may_keep_views():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 600))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    hpa.load(model, input_size=(1, 32, 32))  # warm up: imports and plugin registration allocate too
    tracemalloc.start()
    try:
        graph = hpa.load(model, input_size=(1, 32, 32))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0.95 * weight_bytes <= peak <= 1.3 * weight_bytes, (peak, weight_bytes)
    assert not np.shares_memory(graph["2"].weight, model[2].weight.detach().numpy())
    views = trace_module(model, (1, 32, 32), copy_weights=False)
    assert np.shares_memory(views["2"].weight, model[2].weight.detach().numpy())


@pytest.mark.parametrize("read", READERS.values(), ids=READERS.keys())
def test_requires_grad_and_gradients_are_untouched(read):
    model = small_net().train()
    model[0].weight.requires_grad_(False)
    model(torch.randn(2, *SIZE)).sum().backward()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    grads = {name: (p.grad, None if p.grad is None else p.grad.clone()) for name, p in model.named_parameters()}
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert grads["0.weight"][0] is None and grads["4.weight"][0] is not None
    read(model)
    for name, p in model.named_parameters():
        assert p.requires_grad == flags[name], name
        assert p.grad is grads[name][0], name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name][1], rtol=0, atol=0)
        torch.testing.assert_close(p.detach(), values[name], rtol=0, atol=0)


def two_convs(dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(StandardisedConv(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3))
    return model.to(device=device, dtype=dtype)


def expected_weights(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    computed = model[0].weight - model[0].weight.mean((1, 2, 3), keepdim=True)
    as_numpy = lambda t: t.detach().cpu().to(torch.float64 if t.dtype == torch.float64 else torch.float32).numpy()
    return as_numpy(computed), as_numpy(model[2].weight)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_modules_of_any_float_dtype_trace(dtype):
    model = two_convs(dtype)
    graph = hpa.load(model, input_size=SIZE)
    first, second = expected_weights(model)
    np.testing.assert_array_equal(graph["0"].weight, first)
    np.testing.assert_array_equal(graph["2"].weight, second)
    assert graph["0"].activation == "relu" and graph["2"].input_shape == (4, 8, 8)
    assert graph["0"].params == {}  # computed in the forward pass
    assert graph["2"].params == {"weight": "2.weight", "bias": "2.bias"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is present here")
def test_a_cuda_module_traces_on_its_device_and_keeps_the_cuda_generator():
    model = two_convs(torch.float32, "cuda")
    saved = torch.cuda.get_rng_state()
    graph = hpa.load(model, input_size=SIZE)
    scan_with_init(model)
    assert torch.equal(torch.cuda.get_rng_state(), saved)
    first, second = expected_weights(model)
    np.testing.assert_allclose(graph["0"].weight, first, rtol=0, atol=0)
    np.testing.assert_array_equal(graph["2"].weight, second)
    assert all(p.device.type == "cuda" for p in model.parameters())


def test_layers_from_module_converters_are_copies_too():
    from hpa.nn import lenet9

    torch.manual_seed(0)
    model = lenet9(input_size=16)  # ChannelReLUConv2d layers come from a module converter
    graph = hpa.load(model, input_size=(3, 16, 16))
    layer = graph["features.0"]
    assert layer.channel_bias is not None
    before = layer.weight.copy(), layer.channel_bias.copy()
    with torch.no_grad():
        model.features[0].weight.add_(1.0)
        model.features[0].bias.add_(1.0)
    np.testing.assert_array_equal(layer.weight, before[0])
    np.testing.assert_array_equal(layer.channel_bias, before[1])


def test_seeded_builds_leave_the_callers_generator_alone():
    from hpa.backends.torch_models import seeded

    torch.manual_seed(7)
    saved = torch.get_rng_state()
    built = seeded(lambda: nn.Linear(5, 3), 11)
    assert torch.equal(torch.get_rng_state(), saved)
    torch.manual_seed(11)  # independently: the same build under the same seed
    torch.testing.assert_close(built.weight, nn.Linear(5, 3).weight, rtol=0, atol=0)
