"""Reproduce the zoo's shipped weights with hpa's own trainer.

    python -m hpa_zoo.train digits_cnn --out zoo/
    python -m hpa_zoo.train all --out zoo/

Each model is trained by ``hpa train --plugin digits --arch zoo:NAME --seed SEED``
with its recipe's flags (``hpa_zoo.models.Recipe``) on the CPU, where the
trainer is deterministic (one thread, deterministic algorithms, every random
stream a function of the seed).  The run's final snapshot becomes
``<name>.safetensors`` byte for byte, and ``<name>.json`` records how it was
made: the exact ``hpa train`` command, the data split, the normalisation, the
accuracies, versions and a fingerprint of the initial weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from hpa_zoo.models import MODELS, get, init

CANONICAL_COMMAND = "python -m hpa_zoo.train {name} --out zoo/"


def train_command(name: str, epochs: int | None = None) -> list[str]:
    """The ``hpa train`` arguments (less ``--out``) that reproduce ``name``'s shipped weights."""
    config = get(name)
    flags = config.recipe.flags()
    if epochs is not None:
        at = flags.index("--epochs")
        flags[at + 1] = str(epochs)
    return ["--plugin", "digits", "--arch", f"zoo:{name}", "--seed", str(config.seed), *flags,
            "--device", "cpu", "--cpu-threads", "1", "--stat", "none"]  # the one thread that trained them


def train(name: str, run_dir: str | Path, epochs: int | None = None,
          progress: Callable[[str], None] | None = None) -> Path:
    """Run ``hpa train`` for ``name`` into the new folder ``run_dir``; returns it."""
    from hpa.cli import train as train_cli

    args = train_command(name, epochs) + ["--out", str(run_dir)] + ([] if progress else ["--quiet"])
    train_cli.main(args=args, prog_name="hpa train", standalone_mode=False)
    return Path(run_dir)


def export(name: str, run_dir: str | Path, out_dir: str | Path, epochs: int | None = None) -> tuple[Path, Path]:
    """Copy the run's final snapshot to ``out_dir/<name>.safetensors`` and write ``<name>.json``."""
    from hpa.files import atomic_write_bytes, atomic_write_text

    run_dir, out = Path(run_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    data = (run_dir / lines[-1]["snapshot"]).read_bytes()
    weights, record = out / f"{name}.safetensors", out / f"{name}.json"
    atomic_write_bytes(weights, data)
    metadata = _record(name, json.loads((run_dir / "run.json").read_text()), lines, epochs)
    metadata["weights_sha256"] = hashlib.sha256(data).hexdigest()
    atomic_write_text(record, json.dumps(metadata, indent=2) + "\n")
    return weights, record


def _record(name: str, run: dict[str, Any], lines: list[dict[str, Any]], epochs: int | None) -> dict[str, Any]:
    config = get(name)
    model = init(name)
    split = run["dataset"]["test_split"]
    return {
        "name": name,
        "architecture": config.description,
        "input_size": list(config.input_size),
        "num_classes": config.num_classes,
        "seed": config.seed,
        "dataset": config.dataset,
        "split": {**split, "n_train": run["split"]["n_train"] + run["split"]["n_validation"],
                  "n_test": run["split"]["n_test"]},
        "normalisation": run["normalisation"],  # the model reads (pixels / 16 - mean) / std
        "recipe": run["config"]["recipe"],
        "train_accuracy": round(lines[-1]["train_accuracy"], 6),  # in train mode, over the last epoch
        "test_accuracy": round(lines[-1]["test_accuracy"], 6),
        "init": {"rule": "hpa train's init stream of the seed: hpa_zoo.models.init(name)",
                 "tensor_sums": _fingerprint(model.state_dict())},
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "torch_version": run["versions"].get("torch"),
        "sklearn_version": run["versions"].get("scikit-learn"),
        "python_version": platform.python_version(),
        "platform": run["host"]["platform"],
        "train_command": "hpa train " + shlex.join(train_command(name, epochs) + ["--out", "RUN"]),
        "command": CANONICAL_COMMAND.format(name=name) + (f" --epochs {epochs}" if epochs is not None else ""),
    }


def _fingerprint(state) -> dict[str, float]:
    """Per-tensor float64 sums: enough to tell two initialisations apart, readable in JSON."""
    return {k: round(float(v.double().sum()), 9) for k, v in state.items() if v.is_floating_point()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpa_zoo.train", description=__doc__.splitlines()[0])
    parser.add_argument("name", help=f"model to train: {', '.join(MODELS)} or 'all'")
    parser.add_argument("--out", required=True, help="folder for <name>.safetensors and <name>.json")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (for tests)")
    parser.add_argument("--run", help="keep the hpa train run folder here (default: a temporary folder)")
    args = parser.parse_args(argv)
    names = list(MODELS) if args.name == "all" else [args.name]
    for name in names:
        if name not in MODELS:
            parser.error(f"unknown zoo model {name!r}; choose from {', '.join(MODELS)} or 'all'")
        with tempfile.TemporaryDirectory() as scratch:
            run_dir = Path(args.run) / name if args.run else Path(scratch) / name
            train(name, run_dir, args.epochs)
            weights, record = export(name, run_dir, args.out, args.epochs)
        accuracy = json.loads(record.read_text())["test_accuracy"]
        print(f"{name}: test accuracy {accuracy:.4f} -> {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
