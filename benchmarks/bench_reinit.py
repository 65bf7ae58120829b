"""``hpa reinit`` speed (issue 10 bar): one heatmap cell vs one plain evaluation pass, and whole heatmaps.

    .venv/bin/python benchmarks/bench_reinit.py [--repeat 21] [--threads 1] [--skip-vgg]

* **cell vs pass** (target <= 1.1x): on a trained digits run (the task's default
  architecture, Milisavljevic's (Exploring Convolutional Networks) small CNN that the zoo's digits CNN is trained as),
  the trainer's own evaluation pass over the test split
  (``hpa.experiments.loop.evaluate``) against one heatmap cell: copy a layer's
  checkpoint tensors in, evaluate, copy the trained tensors back.  Median of
  ``--repeat``.
* **digits heatmap**: ``hpa.reinit(run)`` over every conv and every saved epoch of
  a 10-epoch run (4 layers x 11 checkpoints), build and snapshot reads included.
* **VGG-11, CIFAR-shaped**: a run of ``cifar:vgg11`` on a synthetic 3x32x32,
  10-class task (random uint8 images: speed does not depend on the pixels)
  with 512 training and ``--vgg-test`` test images, 2 epochs (3 checkpoints);
  the full heatmap (8 convs x 3 checkpoints) and the time per cell.

Runs are written under a temporary folder and removed afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _interleaved_medians(first, second, repeat: int) -> tuple[float, float]:
    """Median seconds of two functions timed alternately, so drift on a shared machine hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for function, bucket in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            function()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def cell_vs_pass(run: Path, repeat: int) -> dict[str, float]:
    import torch

    from hpa.experiments.data import DeviceData
    from hpa.experiments.loop import evaluate_split as trainer_pass
    from hpa.experiments.reinit import _subjects, _Sweep
    from hpa.experiments.types import Recipe

    subject = _subjects(run, weights=None, plugin=None, data=None, seed=0, device=torch.device("cpu"))[0]()
    sweep = _Sweep(subject, [0], None, False, False, 1, False, torch.device("cpu"), 1000)
    data = DeviceData(subject.dataset, Recipe(), subject.seed, torch.device("cpu"))
    layer = sweep.layers[1]
    tensors = sweep._checkpoint_tensors(0)
    cell_tensors = {key: tensors[key] for key in sweep.layer_keys(layer).values()}
    subject.model.eval()
    with torch.no_grad():
        for _ in range(3):  # warm-up
            trainer_pass(subject.model, data, data.test, "test")
            sweep._evaluate_with(cell_tensors)
        plain, cell = _interleaved_medians(lambda: trainer_pass(subject.model, data, data.test, "test"),
                                           lambda: sweep._evaluate_with(cell_tensors), repeat)
    return {"plain_pass_s": plain, "cell_s": cell, "ratio": cell / plain, "test_images": len(data.test)}


def heatmap_seconds(run: Path) -> tuple[float, int]:
    import hpa

    start = time.perf_counter()
    result = hpa.reinit(run)
    return time.perf_counter() - start, len(result.rows)


def synthetic_cifar_task(test_images: int):
    import numpy as np

    from hpa.experiments.types import Dataset, Recipe, Task
    from hpa.hookspecs import hookimpl

    def dataset(data_dir, download):
        rng = np.random.default_rng(0)
        train = rng.integers(0, 256, (512, 3, 32, 32), dtype=np.uint8)
        test = rng.integers(0, 256, (test_images, 3, 32, 32), dtype=np.uint8)
        return Dataset(train, rng.integers(0, 10, 512), test, rng.integers(0, 10, test_images), num_classes=10,
                       mean=(0.5,), std=(0.25,))

    class Plugin:
        @hookimpl
        def register_experiments(self, register):
            register(Task(name="bench_cifar_shaped", dataset=dataset, architecture="cifar:vgg11",
                          input_size=(3, 32, 32), num_classes=10, recipe=Recipe(epochs=2, lr=0.001)))

    return Plugin()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the trainer uses 1)")
    parser.add_argument("--vgg-test", type=int, default=1000, help="test images of the VGG-11 task")
    parser.add_argument("--skip-vgg", action="store_true")
    args = parser.parse_args()

    import torch

    from hpa import plugins
    from hpa.experiments.train import train

    with tempfile.TemporaryDirectory() as folder:
        digits = Path(folder) / "digits"
        train("digits", out=digits, epochs=10, seed=0, device="cpu", statistics=["projection"])
        torch.set_num_threads(args.threads)
        print(f"torch threads: {torch.get_num_threads()}")
        measured = cell_vs_pass(digits, args.repeat)
        print(f"digits (small_max), {measured['test_images']} test images: plain pass "
              f"{measured['plain_pass_s'] * 1e3:.2f} ms, one cell {measured['cell_s'] * 1e3:.2f} ms, "
              f"ratio {measured['ratio']:.3f} (target <= 1.1)")
        seconds, cells = heatmap_seconds(digits)
        print(f"digits heatmap: {cells} cells in {seconds:.2f} s (build, snapshot reads and n_l included)")
        if args.skip_vgg:
            return
        plugins.register(synthetic_cifar_task(args.vgg_test), "bench_cifar_shaped")
        try:
            vgg = Path(folder) / "vgg11"
            train("bench_cifar_shaped", out=vgg, seed=0, device="cpu", statistics=())
            torch.set_num_threads(args.threads)
            seconds, cells = heatmap_seconds(vgg)
            print(f"VGG-11 on CIFAR-shaped data, {args.vgg_test} test images: {cells} cells in {seconds:.1f} s "
                  f"({seconds / cells:.2f} s per cell)")
        finally:
            plugins.unregister("bench_cifar_shaped")


if __name__ == "__main__":
    main()
