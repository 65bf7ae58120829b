"""Lightning checkpoints whose extra entries pickle other packages' objects, written by the real ``lightning``.

``hyper_parameters`` holds an ``omegaconf`` DictConfig and an ``argparse.Namespace``; the weights under
``state_dict`` are plain tensors.  hpa reads them without importing omegaconf (made unimportable
here, in a fresh interpreter) and without running any code from the file; a checkpoint whose
extra entry would run code is refused, and that code never runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lightning  # test dependencies (the "test" extra), imported plainly: a missing one fails, never skips
import omegaconf

import hpa
from conftest import assert_bad_input
from hpa.errors import HpaWarning



class Net(lightning.LightningModule):
    def __init__(self, cfg, args):
        super().__init__()
        self.save_hyperparameters()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    def training_step(self, batch, index):
        return self(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint written by Trainer.save_checkpoint after two real training steps, and its module."""
    folder = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    cfg = omegaconf.OmegaConf.create({"model": {"width": 6}, "optim": {"lr": 0.1}})
    net = Net(cfg, argparse.Namespace(seed=1, name="run"))
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8))
    trainer = lightning.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu", default_root_dir=str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lightning's advice on workers and logging
        trainer.fit(net, torch.utils.data.DataLoader(data, batch_size=4))
    path = folder / "net.ckpt"
    trainer.save_checkpoint(path)
    return net.eval(), path


def _trusted(path):
    """The checkpoint as the test (which trusts it) reads it, to write variants of it."""
    return torch.load(path, map_location="cpu", weights_only=False)


def run_without_omegaconf(tmp_path, *args: str):
    """``hpa ARGS`` in a fresh interpreter in which ``import omegaconf`` fails; returns CompletedProcess."""
    script = textwrap.dedent("""
        import sys
        sys.modules["omegaconf"] = None  # import omegaconf now raises ImportError
        from hpa.cli import main
        main(sys.argv[1:])
    """)
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600, env=dict(os.environ))


def test_the_checkpoint_really_needs_omegaconf(checkpoint):
    _, path = checkpoint
    with pytest.raises(Exception, match="omegaconf"):
        torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(_trusted(path)["hyper_parameters"]["cfg"], omegaconf.DictConfig)


def test_weights_are_read_without_omegaconf_and_without_running_code(checkpoint, tmp_path):
    net, path = checkpoint
    proc = run_without_omegaconf(tmp_path, "scan", path, "--stat", "projection", "--json")
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("Warning: "), proc.stderr
    for words in ("'hyper_parameters'", "argparse.Namespace", "omegaconf.", "without running pickled code",
                  "--trust-pickle"):
        assert words in warning[0], warning[0]
    result = json.loads(proc.stdout)
    assert set(result["model"]["entries_not_loaded"]) == {"hyper_parameters"}
    conv = next(layer for layer in result["layers"] if layer["name"] == "conv")
    assert conv["bn_folded"]
    # n_l of the trained conv with its BatchNorm folded, from the module itself
    w = net.conv.weight.detach().double().numpy()
    w = w * (net.bn.weight.detach().double().numpy() / np.sqrt(net.bn.running_var.double().numpy() + 1e-5)
             ).reshape(-1, 1, 1, 1)
    flat = w.reshape(len(w), -1)
    cosines = flat.sum(1) / (np.linalg.norm(flat, axis=1) * np.sqrt(flat.shape[1]))
    values = conv["statistics"]["projection"]
    assert values["n_l"] == pytest.approx(np.mean(cosines <= 0), abs=1e-6)
    np.testing.assert_allclose(values["cosines"], cosines, atol=1e-6)


def test_the_library_reads_the_same_weights(checkpoint):
    net, path = checkpoint
    with pytest.warns(HpaWarning, match="hyper_parameters"):
        graph = hpa.load(str(path), fold_bn=False)
    np.testing.assert_array_equal(graph["conv"].weight, net.conv.weight.detach().numpy())
    np.testing.assert_array_equal(graph["fc"].weight, net.fc.weight.detach().numpy())


def test_trusted_loading_without_the_package_is_not_called_corrupt(checkpoint, tmp_path):
    _, path = checkpoint
    line = assert_bad_input(run_without_omegaconf(tmp_path, "scan", path, "--trust-pickle"), "omegaconf",
                            "install", "drop --trust-pickle")
    assert "corrupt" not in line and "not a PyTorch file" not in line


def test_trusted_loading_with_the_package_gives_the_same_weights_silently(checkpoint, run_hpa):
    _, path = checkpoint
    proc = run_hpa("scan", path, "--trust-pickle", "--stat", "projection", "--json")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "entries_not_loaded" not in json.loads(proc.stdout)["model"]


class Payload:
    """An extra entry that runs a shell command when unpickled, as a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_an_extra_entry_that_would_run_code_never_runs(checkpoint, tmp_path, run_hpa):
    _, path = checkpoint
    marker = tmp_path / "ran"
    content = _trusted(path)
    content["callbacks_state"] = Payload(marker)
    bad = tmp_path / "evil.ckpt"
    torch.save(content, bad)
    assert not marker.exists()
    before = sorted(p.name for p in tmp_path.iterdir())
    line = assert_bad_input(run_hpa("scan", bad, "--out", tmp_path / "out"), "'callbacks_state'",
                            "system", "did not run", "--trust-pickle")
    assert "corrupt" not in line
    with pytest.raises(hpa.UnsafeFileError):
        hpa.load(str(bad))
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_checkpoint_without_state_dict_is_one_line(checkpoint, tmp_path):
    _, path = checkpoint
    content = _trusted(path)
    del content["state_dict"]
    bad = tmp_path / "no_weights.ckpt"
    torch.save(content, bad)
    before = sorted(p.name for p in tmp_path.iterdir())
    line = assert_bad_input(run_without_omegaconf(tmp_path, "scan", bad, "--out", tmp_path / "out"),
                            "without a state_dict", "hyper_parameters")
    assert "corrupt" not in line and "Warning" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_truncated_checkpoint_is_called_truncated(checkpoint, tmp_path, run_hpa):
    _, path = checkpoint
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_bad_input(run_hpa("scan", cut), "truncated")
