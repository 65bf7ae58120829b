"""hpa inside your own training loop: a run folder as ``hpa train`` writes it, from a plain PyTorch loop.

    python examples/own_loop.py [OUTPUT_DIR]

Trains a small CNN on scikit-learn's digits (shipped with scikit-learn: offline) for a few
epochs, recording each into OUTPUT_DIR/run with :class:`hpa.Tracker` (and TensorBoard in
OUTPUT_DIR/run/tensorboard), then reads the run back, finds its critical layers with
``hpa.reinit`` and scans its last epoch as ``hpa scan run:DIR`` does.  Runs in seconds.
"""

import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

import hpa

out = Path(sys.argv[1] if len(sys.argv) > 1 else "own-loop-output")

# -- the data and the model: yours --------------------------------------------------------------
digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # (1797, 1, 8, 8) in [0, 1]
labels = torch.tensor(digits.target)
train, test = torch.arange(0, 1500), torch.arange(1500, len(labels))
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                      nn.Conv2d(32, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def accuracy(module, rows=test) -> float:
    with torch.no_grad():
        return float((module(images[rows]).argmax(1) == labels[rows]).double().mean())


# -- the loop: yours, with three lines of hpa ----------------------------------------------------
with hpa.Tracker(model, out=out / "run", input_size=(1, 8, 8), log=["tensorboard"]) as tracker:  # epoch 0 now
    for epoch in range(1, 4):
        model.train()
        for batch in train[torch.randperm(len(train))].split(128):
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        tracker.epoch(epoch, metrics={"train_loss": loss.item(), "test_accuracy": accuracy(model)})
        print(f"epoch {epoch}: train loss {loss.item():.3f}, test accuracy {accuracy(model):.3f}")

# -- everything hpa train gives, from that folder ------------------------------------------------
run = hpa.open_run(out / "run")
print(run.series.pivot(index="epoch", columns="layer", values="projection.n_l").round(3))
critical = hpa.reinit(out / "run", model=model, evaluate=accuracy, epochs=[0])
print("relative accuracy drop when a layer is reset to its initialisation:",
      {layer: round(drop, 3) for layer, drop in critical.criticality().items()})
print(hpa.scan(f"run:{out / 'run'}", statistics=["projection"]).to_pandas()[["name", "projection.n_l"]])
print(f"figures in {out / 'run' / 'figures'}; TensorBoard: tensorboard --logdir {out / 'run' / 'tensorboard'}")
