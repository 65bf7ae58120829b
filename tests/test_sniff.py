"""Files recognised by content: any suffix, or none, reaches the right loader; the rest is refused."""

from __future__ import annotations

import io
import json
import struct
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import hpa
from hpa.sniff import detect, is_matlab, is_onnx, is_torch_file

sys.path.insert(0, str(Path(__file__).parent))
import mcn_export as mcn  # noqa: E402
from conftest import assert_bad_input  # noqa: E402


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, padding=1), nn.ReLU()).eval()


def write(kind: str, path: Path, net: nn.Module | None = None) -> Path:
    """The file a real exporter writes for ``kind``, at ``path``."""
    net = net or small_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit and torch.onnx deprecation notes
        if kind == "torchscript":
            torch.jit.save(torch.jit.script(net), str(path))
        elif kind == "torch_zip":
            torch.save(net.state_dict(), path)
        elif kind == "torch_legacy":
            torch.save(net.state_dict(), path, _use_new_zipfile_serialization=False)
        elif kind == "safetensors":
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
        elif kind == "onnx":
            torch.onnx.export(net, torch.randn(1, 3, 8, 8), str(path), dynamo=False, do_constant_folding=False)
        elif kind == "matlab":
            mcn.export_simplenn(nn.Sequential(net[0], nn.ReLU(), net[3], nn.ReLU()), path, input_size=(3, 8, 8))
    return path


KINDS = ("torchscript", "torch_zip", "torch_legacy", "safetensors", "onnx", "matlab")
ODD_SUFFIXES = ("", ".jit", ".ptl", ".torchscript", ".weights", ".model.v2")


@pytest.mark.parametrize("kind", KINDS)
def test_each_format_is_detected_whatever_its_suffix(tmp_path, kind):
    for suffix in ODD_SUFFIXES:
        path = write(kind, tmp_path / f"model{suffix}")
        assert detect(path) == kind, suffix
    assert is_torch_file(path) == (kind not in ("onnx", "matlab"))
    assert is_onnx(path) == (kind == "onnx") and is_matlab(path) == (kind == "matlab")


@pytest.mark.parametrize("suffix", [".jit", ".ptl", ".torchscript", "", ".pt"])
def test_torchscript_loads_by_content(tmp_path, suffix):
    net = small_net()
    graph = hpa.load(write("torchscript", tmp_path / f"net{suffix}", net))
    truth = hpa.load(net, input_size=(3, 8, 8))
    assert graph.source["content"] == "torchscript" and graph.source["loader"] == "torch"
    assert [l.name for l in graph] == [l.name for l in truth]
    for a, b in zip(graph, truth):
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-12)


@pytest.mark.parametrize("kind, loader", [("torch_zip", "torch"), ("torch_legacy", "torch"),
                                          ("safetensors", "torch"), ("onnx", "onnx"), ("matlab", "matconvnet")])
@pytest.mark.parametrize("suffix", ["", ".weights"])
def test_file_without_a_known_suffix_reaches_its_loader(tmp_path, kind, loader, suffix):
    net = small_net()
    graph = hpa.load(write(kind, tmp_path / f"net{suffix}", net))
    assert graph.source["loader"] == loader
    truth = hpa.load(net, input_size=(3, 8, 8))
    assert len(graph) == 2
    for a, b in zip(graph, truth):  # every route folds the same BatchNorm into the first conv
        np.testing.assert_allclose(np.asarray(a.weight, np.float64), b.weight, rtol=1e-5, atol=1e-6)


def test_protobuf_that_is_not_a_model_is_not_onnx(tmp_path):
    tensor = onnx.numpy_helper.from_array(np.ones((2, 2), np.float32), "w")  # a TensorProto, no graph
    (tmp_path / "tensor").write_bytes(tensor.SerializeToString())
    graph_only = onnx.helper.make_graph([], "g", [], [])  # a GraphProto without the ModelProto around it
    (tmp_path / "graph").write_bytes(graph_only.SerializeToString())
    model = onnx.helper.make_model(graph_only)
    (tmp_path / "model").write_bytes(model.SerializeToString())
    (tmp_path / "model_tail").write_bytes(model.SerializeToString() + b"\x00\x01")
    assert detect(tmp_path / "tensor") is None and detect(tmp_path / "graph") is None
    assert detect(tmp_path / "model") == "onnx" and detect(tmp_path / "model_tail") is None


def test_random_and_text_files_are_not_recognised(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(50):
        (tmp_path / f"r{i}").write_bytes(rng.bytes(int(rng.integers(1, 5000))))
        assert detect(tmp_path / f"r{i}") is None
    (tmp_path / "notes.txt").write_text("MATLAB is not in the first bytes\n{}")
    (tmp_path / "plain.zip").write_bytes(_zip({"readme.txt": b"hi"}))
    assert detect(tmp_path / "notes.txt") is None and detect(tmp_path / "plain.zip") is None
    assert detect(tmp_path) is None and detect(tmp_path / "missing") is None


def test_torch_save_archive_named_code_is_not_torchscript(tmp_path):
    assert detect(tmp_path.joinpath("x")) is None
    (tmp_path / "old").write_bytes(_zip({"code/data.pkl": b"", "code/data/0": b"", "code/version": b"3"}))
    assert detect(tmp_path / "old") == "torch_zip"
    (tmp_path / "ts").write_bytes(_zip({"code/__torch__/m.py": b"", "data.pkl": b""}))
    assert detect(tmp_path / "ts") == "torchscript"


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


# -- bad input through the real CLI: one line on stderr, exit 2, nothing written ---------------

def _safetensors_truncated(tmp_path: Path, name: str) -> Path:
    path = write("safetensors", tmp_path / "full.safetensors")
    data = path.read_bytes()
    (tmp_path / name).write_bytes(data[:-100])
    return tmp_path / name


def _checkpoint(tmp_path: Path, name: str, payload: dict) -> Path:
    torch.save(payload, tmp_path / name)
    return tmp_path / name


BAD = {
    "random bytes, no suffix": (lambda t: _bytes(t, "blob", np.random.default_rng(1).bytes(3000)), (),
                                ["not a model file", "tried", "torch", "onnx", "matconvnet"]),
    "text file, unknown suffix": (lambda t: _bytes(t, "model.cfg", b"layers: 3\n"), (),
                                  ["not a model file", "tried"]),
    "empty file, no suffix": (lambda t: _bytes(t, "empty", b""), (), ["not a model file"]),
    "plain zip, no suffix": (lambda t: _bytes(t, "bundle", _zip({"a.txt": b"x"})), (), ["not a model file"]),
    "truncated safetensors": (lambda t: _safetensors_truncated(t, "w.safetensors"), (), ["truncated"]),
    "truncated safetensors, no suffix": (lambda t: _safetensors_truncated(t, "w"), (), ["truncated"]),
    "unknown checkpoint key": (
        lambda t: _checkpoint(t, "w.pth", {"model": small_net().state_dict(), "model_ema": small_net().state_dict()}),
        ("-o", "checkpoint_key=teacher"), ["teacher", "model, model_ema"]),
    "checkpoint key on a bare state_dict": (
        lambda t: _checkpoint(t, "w.pt", small_net().state_dict()), ("-o", "checkpoint_key=model"),
        ["checkpoint_key", "bare state_dict"]),
    "several weight sets, none preferred": (
        lambda t: _checkpoint(t, "w.ckpt", {"student": small_net().state_dict(), "teacher": small_net().state_dict()}),
        (), ["student, teacher", "-o checkpoint_key="]),
    "pickled module, no suffix": (lambda t: _checkpoint(t, "whole", small_net()), ("--input-size", "3,8,8"),
                                  ["--trust-pickle"]),
    "pickled module": (lambda t: _checkpoint(t, "whole.pt", small_net()), ("--input-size", "3,8,8"),
                       ["--trust-pickle"]),
    "corrupt TorchScript archive": (
        lambda t: _bytes(t, "net.jit", _zip({"archive/code/__torch__/m.py": b"garbage", "archive/data.pkl": b"x"})),
        (), ["TorchScript", "cannot load"]),
    "bn_eps that is not a number": (lambda t: _checkpoint(t, "w.pth", small_net().state_dict()),
                                    ("-o", "bn_eps=small"), ["bn_eps"]),
    "a folder": (lambda t: _folder(t, "weights"), (), ["weights"]),
}


def _bytes(tmp_path: Path, name: str, data: bytes) -> Path:
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


def _folder(tmp_path: Path, name: str) -> Path:
    (tmp_path / name).mkdir()
    (tmp_path / name / "model.bin").write_bytes(b"")
    return tmp_path / name


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gets_one_line_and_status_2(tmp_path, run_hpa, case):
    make, args, words = BAD[case]
    path = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_hpa("scan", path, "--stat", "projection", *args, "--out", tmp_path / "out")
    assert_bad_input(proc, *words)
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output folder, nothing removed


def test_chosen_checkpoint_key_is_in_the_json(tmp_path, run_hpa):
    path = _checkpoint(tmp_path, "w.pth", {"model": small_net().state_dict(), "model_ema": small_net().state_dict()})
    proc = run_hpa("scan", path, "--stat", "projection", "--json", "-o", "checkpoint_key=model_ema")
    assert proc.returncode == 0, proc.stderr
    model = json.loads(proc.stdout)["model"]
    assert model["checkpoint_key"] == "model_ema" and model["checkpoint_keys"] == ["model", "model_ema"]


def test_safetensors_header_length_is_checked(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    good = struct.pack("<Q", len(header)) + header + b"\0\0\0\0"
    assert detect(_bytes(tmp_path, "good", good)) == "safetensors"
    assert detect(_bytes(tmp_path, "long", struct.pack("<Q", len(header) + 50) + header)) is None
    assert detect(_bytes(tmp_path, "array", struct.pack("<Q", 2) + b"[]")) is None
