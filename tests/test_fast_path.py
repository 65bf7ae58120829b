"""The fast training path (issue 11 §1) changes only rounding: at fp32 on CPU it gives the plain path's bytes.

hpa trains with the dataset resident as uint8 and normalised per batch, one batched gather
for shifts and flips, foreach SGD, and snapshots written from host copies on a background
thread.  The plain path below is the textbook loop, written independently: a float32
dataset, each image padded, cropped and flipped on its own, the for-loop SGD, synchronous
steps.  Both see the same documented random draws, so at fp32 their snapshots must agree
bit for bit.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from conftest import assert_bad_input
from test_tasks import write_cifar

ARCH = "cifar:small_max"
RECIPE = {"epochs": 2, "batch_size": 32, "lr": 0.02, "validation": 0.0, "shift": 4, "flip": True}


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("cifar")
    write_cifar(data)
    return data


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory, cifar_dir):
    from hpa.experiments.train import train

    return train("cifar10", out=tmp_path_factory.mktemp("fast") / "run", data=cifar_dir, arch=ARCH, seed=5,
                 device="cpu", statistics=["none"], **RECIPE)


def plain_training(run, cifar_dir) -> dict[str, np.ndarray]:
    """The textbook loop from the run's initial snapshot; returns the final weights."""
    from hpa.experiments.rng import generator, stream_seed
    from hpa.experiments.model import build_model
    from hpa.experiments.config import get_task
    from hpa.experiments.types import Recipe

    recipe = Recipe(**{**Recipe().to_dict(), **RECIPE})
    dataset = get_task("cifar10").dataset(cifar_dir, False)
    model, _ = build_model(ARCH, dataset, 5, "kaiming_normal", "cifar10")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(run / "snapshots/epoch-000.safetensors").items()})
    images = torch.from_numpy(dataset.train_images).float() * (1 / 255)  # the whole set as float32, once
    labels = torch.from_numpy(dataset.train_labels)
    mean = torch.tensor(dataset.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std, dtype=torch.float32).view(1, -1, 1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, foreach=False)
    threads = torch.get_num_threads()
    # conv reductions depend on the thread count: use the one the run records
    torch.set_num_threads(json.loads((run / "run.json").read_text())["config"]["cpu_threads"])
    try:
        for epoch in range(1, recipe.epochs + 1):
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr_at(epoch)
            torch.manual_seed(stream_seed(5, "dropout", epoch))
            draws = generator(5, "augment", epoch)
            order = torch.randperm(len(labels), generator=generator(5, "shuffle", epoch))
            model.train()
            for index in order.split(recipe.batch_size):
                dy = torch.randint(0, 9, (len(index),), generator=draws)
                dx = torch.randint(0, 9, (len(index),), generator=draws)
                flips = torch.rand(len(index), generator=draws) < 0.5
                batch = torch.stack([_shift_flip(images[i], int(y), int(x), bool(f))
                                     for i, y, x, f in zip(index, dy, dx, flips)])
                loss = F.cross_entropy(model((batch - mean) / std), labels[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _shift_flip(image, dy, dx, flip, shift=4):
    """Flip, then zero-pad by ``shift`` and crop at (dy, dx): the usual random-crop augmentation."""
    if flip:
        image = image.flip(-1)
    padded = F.pad(image, (shift, shift, shift, shift))
    return padded[:, dy:dy + image.shape[1], dx:dx + image.shape[2]]


def test_fast_path_gives_the_plain_paths_snapshot_bitwise_at_fp32(fast_run, cifar_dir):
    plain = plain_training(fast_run, cifar_dir)
    fast = load_file(fast_run / "snapshots/epoch-002.safetensors")
    assert sorted(fast) == sorted(plain)
    initial = load_file(fast_run / "snapshots/epoch-000.safetensors")
    assert any(not np.array_equal(fast[k], initial[k]) for k in fast)  # it trained
    for name in fast:
        assert np.array_equal(fast[name], plain[name]), name
    record = json.loads((fast_run / "run.json").read_text())
    assert record["config"]["precision"] == "fp32" and record["config"]["compiled"] is False
    assert record["waiting_seconds"] >= 0


def test_bf16_changes_only_rounding(tmp_path, fast_run, cifar_dir):
    from hpa.experiments.train import train

    run = train("cifar10", out=tmp_path / "bf16", data=cifar_dir, arch=ARCH, seed=5, device="cpu",
                statistics=["none"], precision="bf16", **{**RECIPE, "epochs": 1})
    bf16 = load_file(run / "snapshots/epoch-001.safetensors")
    fp32_metrics = json.loads((fast_run / "metrics.jsonl").read_text().splitlines()[1])
    bf16_metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])
    # Same recipe, same draws: the first epoch's loss agrees to bf16's ~3 significant digits ...
    assert abs(bf16_metrics["train_loss"] - fp32_metrics["train_loss"]) < 0.05 * fp32_metrics["train_loss"]
    # ... but autocast really ran in bf16: the weights are not fp32's.
    fp32_after_one = _train_one_epoch_fp32(tmp_path, cifar_dir)
    assert any(not np.array_equal(bf16[k], fp32_after_one[k]) for k in bf16)
    assert json.loads((run / "run.json").read_text())["config"]["precision"] == "bf16"


def _train_one_epoch_fp32(tmp_path, cifar_dir):
    from hpa.experiments.train import train

    run = train("cifar10", out=tmp_path / "fp32", data=cifar_dir, arch=ARCH, seed=5, device="cpu",
                statistics=["none"], **{**RECIPE, "epochs": 1})
    return load_file(run / "snapshots/epoch-001.safetensors")


def test_precision_flags_are_checked(run_hpa, fast_run):
    assert_bad_input(run_hpa("train", "--plugin", "digits", "--device", "cpu", "--precision", "tf32",
                             "--out", "x"), "tf32", "--device cpu")
    assert_bad_input(run_hpa("train", "--resume", fast_run, "--precision", "bf16"), "--precision", "fp32")


def test_cpu_threads_are_recorded_and_older_runs_resume_on_one_thread(fast_run):
    from hpa.experiments.config import config_from_record

    record = json.loads((fast_run / "run.json").read_text())
    assert record["config"]["cpu_threads"] == record["host"]["threads"] == len(os.sched_getaffinity(0))
    assert config_from_record(record).cpu_threads == record["config"]["cpu_threads"]
    del record["config"]["cpu_threads"]  # run.json as written before --cpu-threads, when CPU runs used one
    assert config_from_record(record).cpu_threads == 1


def test_training_runs_on_the_recorded_thread_count_and_restores_the_callers(tmp_path):
    from hpa.experiments.train import train

    caller = torch.get_num_threads()
    wanted = caller + 1  # not the default: the trainer must set it
    seen = []
    run = train("digits", out=tmp_path / "run", epochs=1, device="cpu", statistics=["none"], cpu_threads=wanted,
                progress=lambda line: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {wanted}  # progress lines come from inside the training loop
    assert torch.get_num_threads() == caller
    assert json.loads((run / "run.json").read_text())["config"]["cpu_threads"] == wanted


@pytest.mark.parametrize("value,words", [("0", ("--cpu-threads", "positive")), ("two", ("--cpu-threads", "two"))])
def test_cpu_threads_flag_is_checked(run_hpa, tmp_path, value, words):
    assert_bad_input(run_hpa("train", "--plugin", "digits", "--device", "cpu", "--cpu-threads", value,
                             "--out", tmp_path / "run"), *words)
    assert not (tmp_path / "run").exists()


# Run in a fresh interpreter: an earlier test's training leaves free holes in this process's heap,
# which glibc reuses whatever its settings.  Prints the minor page faults of touching 64 MiB again
# after the same 64 MiB was allocated, touched and freed: once before, 12 times inside, once after.
FAULTS = """
import json, resource, torch
from hpa.experiments.loop import steady_host_memory

def second_allocation():
    block = torch.ones(16 * 2**20)
    del block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(16 * 2**20)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del block
    return faults

outside = second_allocation()
with steady_host_memory():
    inside = [second_allocation() for _ in range(12)]
print(json.dumps([outside, inside, second_allocation(), resource.getpagesize()]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_cpu_training_keeps_freed_host_memory_mapped():
    """Inside steady_host_memory a freed block is reused without faulting its pages in again."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    outside, inside, after, page = json.loads(proc.stdout)
    pages = 64 * 2**20 // page
    assert outside > pages // 2  # glibc's default: the freed block went back to the kernel
    # The heap grows once or twice, then every freed block is reused.
    assert sum(faults > pages // 2 for faults in inside) <= 3, inside
    assert after > pages // 2  # the defaults are back afterwards


def test_sharded_batches_are_the_single_process_batches():
    """Each rank's rows, put together, are the one-process batch (data, labels and augmentation rows)."""
    from hpa.experiments.data import DeviceData
    from hpa.experiments.types import Dataset, Recipe

    rng = np.random.default_rng(0)
    dataset = Dataset(rng.integers(0, 256, (53, 3, 4, 4), dtype=np.uint8), np.arange(53) % 10,
                      rng.integers(0, 256, (5, 3, 4, 4), dtype=np.uint8), np.arange(5) % 10, num_classes=10)
    recipe = Recipe(validation=0.0)
    single = list(DeviceData(dataset, recipe, 1, torch.device("cpu")).train_batches(1, 3, 16))
    ranks = [list(DeviceData(dataset, recipe, 1, torch.device("cpu"), shard=(r, 3)).train_batches(1, 3, 16))
             for r in range(3)]
    assert [b.total for b in single] == [16, 16, 16, 5]
    for number, whole in enumerate(single):
        parts = [rank[number] for rank in ranks]
        assert torch.equal(torch.cat([p.images for p in parts]), whole.images)
        assert torch.equal(torch.cat([p.labels for p in parts]), whole.labels)
        rows = torch.arange(whole.total)
        assert torch.equal(torch.cat([rows[p.part] for p in parts]), rows)
        assert all(p.total == whole.total for p in parts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_cuda_fast_path_follows_the_cpu_run(tmp_path, cifar_dir, precision):
    """channels_last, fused SGD and pinned host copies on CUDA: one epoch close to the CPU run."""
    from hpa.experiments.train import train

    cpu = _train_one_epoch_fp32(tmp_path, cifar_dir)
    run = train("cifar10", out=tmp_path / "cuda", data=cifar_dir, arch=ARCH, seed=5, device="cuda",
                statistics=["none"], precision=precision, **{**RECIPE, "epochs": 1})
    cuda = load_file(run / "snapshots/epoch-001.safetensors")
    tolerance = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 5e-2}[precision]
    for name in cpu:
        assert cuda[name].flags["C_CONTIGUOUS"]  # channels_last weights are saved in the standard layout
        np.testing.assert_allclose(cuda[name], cpu[name], atol=tolerance, err_msg=name)


@pytest.fixture(scope="module")
def statistics_runs(tmp_path_factory):
    """digits with the projection statistic, once on the writer thread and once in a separate process."""
    from hpa.experiments.train import train

    folder = tmp_path_factory.mktemp("statistics")
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        for mode in ("0", "1"):
            patch.setenv("HPA_STATISTICS_PROCESS", mode)
            runs[mode] = train("digits", out=folder / f"process-{mode}", epochs=2, batch_size=128, device="cpu")
    return runs


def test_statistics_in_a_separate_process_write_the_same_files(statistics_runs):
    thread, process = statistics_runs["0"], statistics_runs["1"]
    assert (process / "series.csv").read_bytes() == (thread / "series.csv").read_bytes()
    for epoch in range(3):
        name = f"stats/epoch-{epoch:03d}.json"
        assert (process / name).read_bytes() == (thread / name).read_bytes()
    finished = [json.loads(line) for line in (process / "stats/finished.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in finished] == [0, 1, 2] and all("finished" in line for line in finished)


def test_resume_redoes_statistics_a_kill_left_unfinished(tmp_path, statistics_runs, monkeypatch):
    """The state can be ahead of the statistics process: resuming records the missing snapshots."""
    import shutil

    from hpa.experiments.train import train

    run = tmp_path / "run"
    shutil.copytree(statistics_runs["1"], run)
    expected = (run / "series.csv").read_bytes()
    # As if killed after epoch 2's state was saved but before its statistics finished.
    lines = (run / "stats/finished.jsonl").read_text().splitlines()
    (run / "stats/finished.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (run / "stats/epoch-002.json").unlink()
    rows = (run / "series.csv").read_text().splitlines(keepends=True)
    (run / "series.csv").write_text("".join(row for row in rows if not row.startswith("2,")))
    monkeypatch.setenv("HPA_STATISTICS_PROCESS", "1")
    train(resume=run)
    assert (run / "series.csv").read_bytes() == expected
    assert (run / "stats/epoch-002.json").read_bytes() == (statistics_runs["1"] / "stats/epoch-002.json").read_bytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here; torch.compile on this "
                                                          "CPU takes ~50 s, too slow for the suite)")
def test_compile_changes_only_rounding(tmp_path, cifar_dir):
    from hpa.experiments.train import train

    runs = {}
    for compiled in (False, True):
        runs[compiled] = train("cifar10", out=tmp_path / str(compiled), data=cifar_dir, arch=ARCH, seed=5,
                               device="cuda", statistics=["none"], compiled=compiled, **{**RECIPE, "epochs": 1})
    eager, compiled = (load_file(runs[c] / "snapshots/epoch-001.safetensors") for c in (False, True))
    assert sorted(eager) == sorted(compiled)  # no _orig_mod. prefixes
    for name in eager:
        np.testing.assert_allclose(compiled[name], eager[name], atol=1e-4, err_msg=name)
