"""``hpa.integrations``: a real Lightning fit and a real Hugging Face ``Trainer.train()`` each leave a run folder
``hpa.open_run`` reads, whose last snapshot is the model's final weights; importing hpa imports neither."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import hpa


def _convs() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def _data():
    draws = torch.Generator().manual_seed(0)
    return torch.randn(32, 1, 8, 8, generator=draws), torch.randint(0, 3, (32,), generator=draws)


def _final_snapshot_is(run, model) -> None:
    final = load_file(str(run.snapshots()[max(run.epochs())]))
    state = model.state_dict()
    assert final.keys() == state.keys()
    assert all(torch.equal(final[key], value) for key, value in state.items())


def test_lightning_fit_writes_a_run_folder(tmp_path):
    import lightning.pytorch as pl

    from hpa.integrations.lightning import HPACallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _convs()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, index):
            loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            return loss

        def validation_step(self, batch, index):
            self.log("val_accuracy", (self(batch[0]).argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    model = Net()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=8)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[HPACallback(tmp_path / "run", input_size=(1, 8, 8), figures=False)])
    trainer.fit(model, batches, batches)
    run = hpa.open_run(tmp_path / "run")
    assert run.record["status"] == "complete" and run.epochs() == [0, 1, 2]
    _final_snapshot_is(run, model)
    first = load_file(str(run.snapshots()[0]))
    assert all(torch.equal(first[k], v) for k, v in init.items())  # epoch 0: before the first step
    last = run.metrics.iloc[-1]
    assert last["val_accuracy"] == pytest.approx(float(trainer.callback_metrics["val_accuracy"]))
    assert last["train_loss"] == pytest.approx(float(trainer.callback_metrics["train_loss"]))
    assert run.metrics["train_loss"].iloc[1] != last["train_loss"]  # each epoch's own value


_LIGHTNING_DDP = """
import sys
import lightning.pytorch as pl
import torch
from torch import nn
from hpa.integrations.lightning import HPACallback

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, index):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

out = sys.argv[1]
torch.manual_seed(0)
model = Net()
draws = torch.Generator().manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8, generator=draws),
                                      torch.randint(0, 3, (32,), generator=draws))
trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=out + "-lightning", callbacks=[HPACallback(out, input_size=(1, 8, 8))])
# Lightning's DistributedSampler gives each rank half the rows; DDP averages the gradients.
trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
torch.save(model.state_dict(), f"{out}-rank{trainer.global_rank}.pt")
"""


def test_lightning_ddp_fit_on_two_processes_writes_one_run_folder_from_rank_0(tmp_path):
    import os
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "fit.py"
    script.write_text(_LIGHTNING_DDP)
    out = tmp_path / "run"
    # strategy "ddp" starts rank 1 by running this script again, as Lightning does outside notebooks
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["fit.py", "run", "run-rank0.pt", "run-rank1.pt"]
    run = hpa.open_run(out)
    assert run.record["status"] == "complete" and run.record["processes"] == 2 and run.epochs() == [0, 1, 2]
    assert run.metrics["epoch"].tolist() == [0, 1, 2]  # one line per epoch: rank 1 wrote none of its own
    assert set(run.series["epoch"]) == {0, 1, 2} and (out / "figures").is_dir()
    final = load_file(str(run.snapshots()[2]))
    ranks = [torch.load(tmp_path / f"run-rank{rank}.pt") for rank in (0, 1)]
    for state in ranks:  # the same weights on every rank, and they are the last snapshot
        assert final.keys() == state.keys() and all(torch.equal(final[k], v) for k, v in state.items())
    first = load_file(str(run.snapshots()[0]))
    assert not all(torch.equal(first[k], v) for k, v in final.items())  # it trained


class _HFNet(nn.Module):
    """A model as the Trainer calls it: keyword inputs, a loss when labels are given."""

    def __init__(self):
        super().__init__()
        self.net = _convs()

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class _Images(torch.utils.data.Dataset):
    def __init__(self):
        self.images, self.labels = _data()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


@pytest.mark.parametrize("strategy", ["epoch", "steps"])
def test_hugging_face_trainer_writes_a_run_folder(tmp_path, strategy):
    from transformers import Trainer, TrainingArguments

    from hpa.integrations.transformers import HPACallback

    torch.manual_seed(0)
    model = _HFNet()
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), num_train_epochs=2, per_device_train_batch_size=8,
                             learning_rate=0.1, save_strategy=strategy, save_steps=3, eval_strategy="epoch",
                             logging_strategy="epoch", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    callback = HPACallback(tmp_path / "run", input_size=(1, 8, 8), figures=False)
    trainer = Trainer(model=model, args=args, train_dataset=_Images(), eval_dataset=_Images(), callbacks=[callback])
    trainer.train()
    run = hpa.open_run(tmp_path / "run")
    assert run.record["status"] == "complete"
    _final_snapshot_is(run, model)
    metrics = run.metrics
    evaluations = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evaluations) == 2
    if strategy == "epoch":
        assert run.epochs() == [0, 1, 2]
        assert metrics["eval_loss"].tolist()[1:] == pytest.approx(evaluations)  # each epoch's own evaluation
        assert metrics["step"].tolist()[1:] == [4, 8]
    else:  # 8 steps: saves at steps 3 and 6, and the last step, as the Trainer saves
        assert run.epochs() == [0, 1, 2, 3]
        assert metrics["step"].tolist()[1:] == [3, 6, 8]
        assert metrics["eval_loss"].tolist()[3] == pytest.approx(evaluations[1])


def test_importing_hpa_imports_no_framework_and_a_missing_one_names_its_extra():
    probe = ("import sys, hpa, hpa.integrations; "
             "print(sorted(m for m in ('lightning', 'transformers', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
    for module, extra in (("lightning", "lightning"), ("transformers", "transformers")):
        missing = f"import sys; sys.modules[{module!r}] = None; import hpa.integrations.{module}"
        proc = subprocess.run([sys.executable, "-c", missing], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1].endswith(f"pip install 'hpa[{extra}]'"), proc.stderr
