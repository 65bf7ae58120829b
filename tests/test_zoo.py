"""The embedded zoo: really trained (by hpa train) weights, a faithful loader, the true init, a recipe that runs."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import hpa
from hpa_zoo import models, train

NAMES = sorted(models.MODELS)


def held_out_digits(record: dict):
    """The test split, rebuilt here from scikit-learn and the parameters the JSON records."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    split = record["split"]
    assert split["function"] == "sklearn.model_selection.train_test_split" and split["stratify"] == "target"
    _, x_test, _, y_test = train_test_split(digits.images, digits.target, test_size=split["test_size"],
                                            random_state=split["random_state"], stratify=digits.target)
    assert len(y_test) == split["n_test"]
    mean, std = record["normalisation"]["mean"][0], record["normalisation"]["std"][0]
    return torch.tensor((x_test / 16.0 - mean) / std, dtype=torch.float32)[:, None], torch.tensor(y_test)


def shipped_module(name: str) -> torch.nn.Module:
    """The architecture with the shipped file's tensors, built without the zoo loader."""
    config = models.MODELS[name]
    module = config.build()
    module.load_state_dict(load_file(str(config.weights_path)))
    return module.eval()


def graph_forward(graph: hpa.ConvGraph, x: torch.Tensor) -> torch.Tensor:
    """Run a chain-shaped graph from its layers alone (weights, padding, predecessors and the ops between)."""
    outputs = {"input": x.double()}
    ops = {"relu": F.relu, "max_pool2d": lambda h: F.max_pool2d(h, 2), "flatten": lambda h: h.flatten(1)}
    for layer in graph:
        (previous,) = layer.predecessors
        h = outputs[previous]
        for op in layer.via[previous]:
            h = ops[op](h)
        weight, bias = torch.from_numpy(np.asarray(layer.weight, np.float64)), torch.from_numpy(
            np.asarray(layer.bias, np.float64))
        if layer.kind == "linear":
            outputs[layer.name] = F.linear(h, weight, bias)
        else:
            assert all(begin == end for begin, end in layer.padding)
            outputs[layer.name] = F.conv2d(h, weight, bias, layer.stride, [p for p, _ in layer.padding],
                                           layer.dilation, layer.groups)
    return outputs[graph.layers[-1].name]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean())


# -- the shipped files ----------------------------------------------------------------

def test_list_models_lists_the_shipped_models():
    assert hpa.list_models("zoo") == ["digits_cnn", "digits_vgg"]
    assert hpa.list_models("zoo", "*cnn") == ["digits_cnn"]


@pytest.mark.parametrize("name", NAMES)
def test_shipped_weights_are_trained(name):
    record = models.MODELS[name].metadata()
    x, y = held_out_digits(record)
    with torch.no_grad():
        module_accuracy = accuracy(shipped_module(name)(x), y)
    assert module_accuracy >= 0.9
    assert module_accuracy == pytest.approx(record["test_accuracy"], abs=1e-6)
    # the graph the loader hands to statistics classifies just as well: it holds the trained weights
    assert accuracy(graph_forward(hpa.load(f"zoo:{name}"), x), y) == pytest.approx(module_accuracy, abs=1e-6)
    # ... and an untrained init does not
    assert accuracy(graph_forward(hpa.load(f"zoo:{name}", weights="none"), x), y) < 0.5


@pytest.mark.parametrize("name", NAMES)
def test_shipped_record_describes_the_files(name):
    config = models.MODELS[name]
    record = config.metadata()
    assert record["name"] == name and record["input_size"] == list(config.input_size)
    assert record["seed"] == config.seed and record["command"] == f"python -m hpa_zoo.train {name} --out zoo/"
    assert record["recipe"]["epochs"] == config.recipe.epochs and record["torch_version"]
    assert record["train_command"].startswith(f"hpa train --plugin digits --arch zoo:{name} --seed {config.seed} ")
    assert record["weights_sha256"] == hashlib.sha256(config.weights_path.read_bytes()).hexdigest()
    assert record["n_parameters"] < 100_000


# -- the loader -----------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_graph_matches_the_module_with_batchnorm_folded(name):
    module = shipped_module(name)
    graph = hpa.load(f"zoo:{name}")
    convs = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert [layer.name for layer in graph if layer.kind == "conv2d"] == convs
    for conv_name in convs:
        layer = graph[conv_name]
        conv = getattr(module, conv_name).double()
        bn = getattr(module, conv_name.replace("conv", "bn"), None)
        assert layer.bn_folded == (bn is not None) and layer.activation == "relu"
        inputs = torch.randn(4, *layer.input_shape, generator=torch.Generator().manual_seed(1)).double()
        with torch.no_grad():
            expected = bn.double()(conv(inputs)) if bn is not None else conv(inputs)
            weight, bias = (torch.from_numpy(np.asarray(a, np.float64)) for a in (layer.weight, layer.bias))
            folded = F.conv2d(inputs, weight, bias, padding=1)
        torch.testing.assert_close(folded, expected, rtol=1e-9, atol=1e-9)


def test_no_fold_bn_gives_the_raw_conv_weights():
    module = shipped_module("digits_cnn")
    graph = hpa.load("zoo:digits_cnn", fold_bn=False)
    assert not any(layer.bn_folded for layer in graph)
    np.testing.assert_array_equal(graph["conv1"].weight, module.conv1.weight.detach().numpy())
    assert graph.source["weights"] == "trained" and graph.source["test_accuracy"] >= 0.9


def test_weights_none_is_the_training_init():
    from hpa.experiments.rng import stream_seed

    config = models.MODELS["digits_cnn"]
    torch.manual_seed(stream_seed(config.seed, "init"))  # hpa train's init stream, applied here by hand
    fresh = config.build()
    graph = hpa.load("zoo:digits_cnn", weights="none", fold_bn=False)
    for name in ("conv1", "conv2", "conv3", "conv4", "fc"):
        np.testing.assert_array_equal(graph[name].weight, getattr(fresh, name).weight.detach().numpy())
    # the shipped weights were trained from this very init: the recorded fingerprint matches this torch's RNG
    recorded = config.metadata()["init"]["tensor_sums"]
    for key, value in fresh.state_dict().items():
        if value.is_floating_point():
            assert float(value.double().sum()) == pytest.approx(recorded[key], rel=1e-7, abs=1e-9), key
    other = hpa.load("zoo:digits_cnn", weights="none", seed=1, fold_bn=False)
    assert not np.array_equal(other["conv1"].weight, graph["conv1"].weight)
    assert other.source["seed"] == config.seed + 1


def test_compare_init_scans_the_training_init():
    result = hpa.scan("zoo:digits_cnn", statistics=["projection"], compare_init=True)
    assert result.graph.source["weights"] == "trained" and result.init.source["weights"] == "init"
    from hpa.experiments.rng import stream_seed

    torch.manual_seed(stream_seed(models.MODELS["digits_cnn"].seed, "init"))
    fresh = models.MODELS["digits_cnn"].build()
    np.testing.assert_array_equal(result.init["conv3"].weight, fresh.conv3.weight.detach().numpy())


def test_weights_path_loads_a_local_state_dict(tmp_path):
    path = tmp_path / "copy.pt"
    torch.save(shipped_module("digits_cnn").state_dict(), path)
    graph = hpa.load("zoo:digits_cnn", weights=str(path))
    shipped = hpa.load("zoo:digits_cnn")
    for layer in shipped:
        np.testing.assert_array_equal(graph[layer.name].weight, layer.weight)
    assert graph.source["weights"] == str(path)


def test_weights_for_another_architecture_is_a_load_error():
    with pytest.raises(hpa.LoadError, match="do not fit this zoo architecture"):
        hpa.load("zoo:digits_cnn", weights=str(models.MODELS["digits_vgg"].weights_path))


def test_unknown_weights_name_is_an_option_error():
    with pytest.raises(hpa.OptionError, match="none"):
        hpa.load("zoo:digits_cnn", weights="IMAGENET1K_V1")


def test_unknown_name_suggests_close_names():
    with pytest.raises(hpa.SpecError, match="did you mean 'zoo:digits_cnn'"):
        hpa.load("zoo:digits_cn")
    with pytest.raises(hpa.SpecError, match="digits_cnn, digits_vgg"):
        hpa.load("zoo:resnet50")


def test_the_plugin_module_does_not_import_torch():
    code = ("import sys, hpa_plugins.zoo_loader as z; names = z.list_models(); "
            "print(names, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['digits_cnn', 'digits_vgg'] False"


def test_list_models_command(run_hpa):
    proc = run_hpa("list-models", "zoo")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["digits_cnn", "digits_vgg"]


# -- the recipe -------------------------------------------------------------------------

def test_training_recipe_runs_and_its_file_loads(tmp_path, capsys):
    assert train.main(["digits_cnn", "--out", str(tmp_path), "--epochs", "1"]) == 0
    record = json.loads((tmp_path / "digits_cnn.json").read_text())
    assert record["recipe"]["epochs"] == 1 and record["command"].endswith("--epochs 1")
    assert record["init"]["tensor_sums"] == models.MODELS["digits_cnn"].metadata()["init"]["tensor_sums"]
    assert 0.1 < record["test_accuracy"] <= 1.0
    graph = hpa.load("zoo:digits_cnn", weights=str(tmp_path / "digits_cnn.safetensors"))
    assert [layer.name for layer in graph] == ["conv1", "conv2", "conv3", "conv4", "fc"]
    assert not np.array_equal(graph["conv1"].weight, hpa.load("zoo:digits_cnn")["conv1"].weight)
    assert "digits_cnn: test accuracy" in capsys.readouterr().out


def test_training_leaves_the_callers_rng_and_threads_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    models.init("digits_cnn")
    assert torch.equal(torch.rand(3), expected)
    train.train("digits_cnn", tmp_path / "run", epochs=1)
    assert torch.get_num_threads() == threads
    torch.manual_seed(123)
    train.train("digits_cnn", tmp_path / "again", epochs=1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", NAMES)
def test_hpa_train_reproduces_the_shipped_weights_byte_for_byte(name, run_hpa, tmp_path):
    """The zoo comes from the trainer: its recorded 'hpa train' command gives the shipped file's sha256."""
    record = models.MODELS[name].metadata()
    if record["torch_version"] != torch.__version__.split("+")[0]:  # the local tag (+cu132, +cpu) aside
        pytest.skip(f"bitwise on the torch that trained the zoo ({record['torch_version']}), not {torch.__version__}")
    args = shlex.split(record["train_command"])[1:]
    args[args.index("RUN")] = str(tmp_path / "run")
    proc = run_hpa(*args, "--quiet")
    assert proc.returncode == 0, proc.stderr
    final = tmp_path / "run" / "snapshots" / f"epoch-{record['recipe']['epochs']:03d}.safetensors"
    digest = hashlib.sha256(final.read_bytes()).hexdigest()
    assert digest == record["weights_sha256"] == hashlib.sha256(models.MODELS[name].weights_path.read_bytes()).hexdigest()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["test_accuracy"] == pytest.approx(record["test_accuracy"], abs=1e-6)
