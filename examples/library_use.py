"""Using hpa as a library: the embedded zoo model, then your own torch module.

    python examples/library_use.py [OUTPUT_DIR]

Runs offline in a few seconds.  Each block is written to be pasted into a notebook cell.
"""

import sys
from pathlib import Path

import hpa

out = Path(sys.argv[1] if len(sys.argv) > 1 else "library-use-output")

# -- 1. a model by spec: the embedded default -----------------------------------------
graph = hpa.load("zoo:digits_cnn")  # a hpa.ConvGraph: the one type every statistic reads
for layer in graph:
    print(f"{layer.name:6} {layer.kind:7} {str(layer.weight.shape):16} act={layer.activation:5} "
          f"bn_folded={layer.bn_folded} from={list(layer.predecessors)}")

# Scan it, comparing the trained weights with the seeded init they were trained from.
result = hpa.scan("zoo:digits_cnn", compare_init=True)
for entry in result.to_dict()["layers"]:
    projection = entry["statistics"].get("projection")
    if projection:
        print(f"{entry['name']:6} n_l={projection['n_l']:.3f} mean cosine={projection['mean']:+.3f}")

table = result.to_pandas()  # one row per layer (needs pandas)
print(table.filter(regex="^(name|kind|projection\\.n_l)$"))
out.mkdir(parents=True, exist_ok=True)
result.to_csv(out / "digits_cnn.csv")
print("figures:", [p.name for p in result.plot(out / "digits_cnn")])

# -- 2. your own torch module, in memory ----------------------------------------------
import torch  # noqa: E402  (imported here to show that step 1 needs no torch code of yours)
from torch import nn  # noqa: E402

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
)
# ... train it here ...
mine = hpa.scan(model, input_size=(3, 32, 32), statistics=["projection"], with_linear=True)
for entry in mine.to_dict()["layers"]:
    print(entry["name"], entry["kind"], entry["statistics"]["projection"]["n_l"])
print("skipped:", mine.to_dict()["skipped"])
