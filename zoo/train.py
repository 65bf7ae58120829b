"""The zoo's training recipe: reproduces the shipped weights on CPU in well under a minute.

    python -m hpa_zoo.train digits_cnn --out zoo/
    python -m hpa_zoo.train all --out zoo/

Deterministic: the data split, the initialisation and the batch order are all
seeded, and training runs on one CPU thread with deterministic algorithms, so
the same torch version on the same platform gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hpa_zoo.models import MODELS, Recipe, get, init

CANONICAL_COMMAND = "python -m hpa_zoo.train {name} --out zoo/"


def digits_split(recipe: Recipe):
    """(x_train, y_train, x_test, y_test) as numpy arrays; x shaped (N, 1, 8, 8) in [0, 1]."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=recipe.test_size, random_state=recipe.split_seed, stratify=digits.target)
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def accuracy(model, x, y) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on numpy arrays."""
    import torch

    model.eval()
    with torch.no_grad():
        predicted = model(torch.as_tensor(x)).argmax(dim=1).numpy()
    return float((predicted == y).mean())


def train(name: str, epochs: int | None = None, log: Callable[[str], None] = print):
    """Train ``name`` from ``init(name)`` with its recipe; returns (model, metadata dict)."""
    import torch

    config = get(name)
    recipe = config.recipe if epochs is None else _replace(config.recipe, epochs=epochs)
    x_train, y_train, x_test, y_test = digits_split(recipe)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # CPU reductions differ with the thread count
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    try:
        model = init(name)
        initial = _fingerprint(model.state_dict())
        _fit(model, recipe, config.seed, torch.as_tensor(x_train), torch.as_tensor(y_train), log)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    model.eval()
    metadata = {
        "name": name,
        "architecture": config.description,
        "input_size": list(config.input_size),
        "num_classes": config.num_classes,
        "seed": config.seed,
        "dataset": config.dataset,
        "split": {"function": "sklearn.model_selection.train_test_split", "test_size": recipe.test_size,
                  "random_state": recipe.split_seed, "stratify": "target",
                  "n_train": int(len(y_train)), "n_test": int(len(y_test))},
        "recipe": vars(recipe) | {"loss": "cross_entropy", "batch_order_seed": config.seed + 1,
                                  "threads": 1, "deterministic_algorithms": True},
        "train_accuracy": round(accuracy(model, x_train, y_train), 6),
        "test_accuracy": round(accuracy(model, x_test, y_test), 6),
        "init": {"rule": "torch.manual_seed(seed); then build the model (hpa_zoo.models.init(name))",
                 "equals_build_seed": _fingerprint(init(name).state_dict()) == initial,
                 "tensor_sums": initial},
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "train_seconds": round(time.perf_counter() - started, 2),
        "torch_version": torch.__version__,
        "sklearn_version": _version("scikit-learn"),
        "python_version": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "command": CANONICAL_COMMAND.format(name=name) + (f" --epochs {epochs}" if epochs is not None else ""),
    }
    return model, metadata


def _fit(model, recipe: Recipe, seed: int, x, y, log) -> None:
    import torch
    import torch.nn.functional as F

    if recipe.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                    weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    order = torch.Generator().manual_seed(seed + 1)
    for epoch in range(recipe.epochs):
        model.train()
        total = 0.0
        for batch in torch.randperm(len(y), generator=order).split(recipe.batch_size):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        if epoch == recipe.epochs - 1 or epoch % 10 == 0:
            log(f"epoch {epoch + 1}/{recipe.epochs}: loss {total / len(y):.4f}")


def save(model, metadata: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<name>.safetensors`` and ``<name>.json`` into ``out_dir`` (each atomically)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = metadata["name"]
    weights, record = out / f"{name}.safetensors", out / f"{name}.json"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    partial = weights.with_suffix(".safetensors.partial")
    # One metadata key only: safetensors writes a multi-key map in random order, so the bytes would vary.
    save_file(state, str(partial), metadata={"format": "pt"})
    partial.chmod(0o644)
    metadata = dict(metadata, weights_sha256=hashlib.sha256(partial.read_bytes()).hexdigest())
    os.replace(partial, weights)
    partial = record.with_suffix(".json.partial")
    partial.write_text(json.dumps(metadata, indent=2) + "\n")
    os.replace(partial, record)
    return weights, record


def _fingerprint(state) -> dict[str, float]:
    """Per-tensor float64 sums: enough to tell two initialisations apart, readable in JSON."""
    return {k: round(float(v.double().sum()), 9) for k, v in state.items() if v.is_floating_point()}


def _replace(recipe: Recipe, **changes) -> Recipe:
    from dataclasses import replace

    return replace(recipe, **changes)


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpa_zoo.train", description=__doc__.splitlines()[0])
    parser.add_argument("name", help=f"model to train: {', '.join(MODELS)} or 'all'")
    parser.add_argument("--out", required=True, help="folder for <name>.safetensors and <name>.json")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (for tests)")
    args = parser.parse_args(argv)
    names = list(MODELS) if args.name == "all" else [args.name]
    for name in names:
        if name not in MODELS:
            parser.error(f"unknown zoo model {name!r}; choose from {', '.join(MODELS)} or 'all'")
        model, metadata = train(name, args.epochs, log=lambda text, n=name: print(f"{n}: {text}", file=sys.stderr))
        weights, _ = save(model, metadata, args.out)
        print(f"{name}: test accuracy {metadata['test_accuracy']:.4f} "
              f"(train {metadata['train_accuracy']:.4f}) -> {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
