"""Loading a 550 MB SimpleNN VGG-19 .mat: hpa (load + projection) against scipy.io.loadmat alone.

Bars (issue 3): time <= 1.5x loadmat's, and peak RSS above the process after it
imported its libraries <= 1.2x the file's size.

    .venv/bin/python benchmarks/bench_matconvnet.py [--uncompressed] [--repeat 3] [--keep]

The file is built once under benchmarks/data/ (random weights, the zoo's layout:
``layers`` cell array of conv/relu/pool/softmax structs, ``meta.normalization``)
and deleted afterwards unless ``--keep``.  By default it is written compressed,
as MATLAB's ``save -v7`` does and as the model zoo's files are; ``--uncompressed``
writes a v6-style file instead, where loadmat does no zlib work.  Every timing is
taken in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"

VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def build(path: Path, compress: bool) -> None:
    import numpy as np
    import scipy.io

    rng = np.random.default_rng(0)
    layers, channels, block, index = [], 3, 1, 1

    def conv(name, kh, kw, cin, cout, pad):
        filters = (rng.standard_normal((kh, kw, cin, cout), dtype=np.float32) * 0.01)
        weights = np.empty((1, 2), dtype=object)
        weights[0, 0] = filters
        weights[0, 1] = rng.standard_normal((1, cout), dtype=np.float32) * 0.01
        return {"name": name, "type": "conv", "weights": weights, "size": np.array([[kh, kw, cin, cout]], float),
                "pad": np.array([[pad] * 4], float), "stride": np.array([[1, 1]], float),
                "dilate": np.array([[1, 1]], float), "precious": False, "opts": np.empty((1, 0), dtype=object)}

    def relu(name):
        return {"name": name, "type": "relu", "leak": 0.0, "precious": False}

    for item in VGG19:
        if item == "M":
            layers.append({"name": f"pool{block}", "type": "pool", "method": "max",
                           "pool": np.array([[2, 2]], float), "stride": np.array([[2, 2]], float),
                           "pad": np.zeros((1, 4)), "precious": False, "opts": np.empty((1, 0), dtype=object)})
            block, index = block + 1, 1
            continue
        layers.append(conv(f"conv{block}_{index}", 3, 3, channels, item, 1))
        layers.append(relu(f"relu{block}_{index}"))
        channels, index = item, index + 1
    layers += [conv("fc6", 7, 7, 512, 4096, 0), relu("relu6"), conv("fc7", 1, 1, 4096, 4096, 0), relu("relu7"),
               conv("fc8", 1, 1, 4096, 1000, 0), {"name": "prob", "type": "softmax", "precious": False}]
    cell = np.empty((1, len(layers)), dtype=object)
    for i, layer in enumerate(layers):
        cell[0, i] = layer
    meta = {"inputs": {"name": "input", "size": np.array([[224, 224, 3, 10]], float)},
            "normalization": {"imageSize": np.array([[224, 224, 3]], float), "averageImage": np.zeros((1, 1, 3)),
                              "keepAspect": True, "interpolation": "bilinear", "border": np.array([[32, 32]], float)},
            "classes": {"name": np.array([[f"n{i:08d}" for i in range(1000)]], dtype=object)}}
    DATA.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    scipy.io.savemat(partial, {"layers": cell, "meta": meta}, do_compression=compress)
    os.replace(partial, path)


# The measured child: imports its libraries, resets the peak-RSS counter, then does one job.
CHILD = r"""
import json, sys, time
mode, path = sys.argv[1], sys.argv[2]
import numpy, scipy.io
if mode.startswith("hpa"):
    import hpa, hpa.api, hpa.backends.matconvnet
    from hpa.plugins import registries
    registries()
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
    f.write("5")
base = status("VmRSS")
start = time.perf_counter()
if mode == "loadmat":
    mat = scipy.io.loadmat(path, squeeze_me=False, struct_as_record=False)
else:
    result = hpa.scan(path, statistics=["projection"], with_linear=(mode == "hpa-with-linear"))
    assert len(result.graph) == 19
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_above": status("VmHWM") - base}))
"""


def measure(mode: str, path: Path) -> dict[str, float]:
    env = dict(os.environ, HPA_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(path)], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uncompressed", action="store_true", help="write the file without zlib compression")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side (fresh processes)")
    parser.add_argument("--keep", action="store_true", help="keep the 550 MB file afterwards")
    args = parser.parse_args()
    compress = not args.uncompressed
    path = DATA / f"vgg19-simplenn-{'v7' if compress else 'v6'}.mat"
    try:
        if not path.exists():
            start = time.perf_counter()
            build(path, compress)
            print(f"built {path} in {time.perf_counter() - start:.0f} s")
        size = path.stat().st_size
        print(f"file: {path.name}, {size / 1e6:.0f} MB ({'zlib-compressed, as save -v7' if compress else 'uncompressed'})")
        # "hpa" is the default scan (fc6-fc8, convs that are fully-connected layers, follow the linear
        # rule as in torchvision's VGG); "hpa-with-linear" also reads every fc weight, for information.
        runs: dict[str, list[dict[str, float]]] = {"loadmat": [], "hpa": [], "hpa-with-linear": []}
        measure("loadmat", path)  # warm the page cache so both sides read from memory
        for _ in range(args.repeat):
            for mode in runs:
                runs[mode].append(measure(mode, path))
        best = {m: min(r["seconds"] for r in rs) for m, rs in runs.items()}
        peak = {m: max(r["peak_above"] for r in rs) for m, rs in runs.items()}
        for mode in runs:
            times = ", ".join(f"{r['seconds']:.2f}" for r in runs[mode])
            print(f"{mode:15s} time {best[mode]:6.2f} s (runs: {times})   peak RSS above imports "
                  f"{peak[mode] / 1e6:6.0f} MB = {peak[mode] / size:.2f}x file")
        time_ratio, rss_ratio = best["hpa"] / best["loadmat"], peak["hpa"] / size
        print(f"time ratio hpa/loadmat: {time_ratio:.2f} (bar 1.5)  {'PASS' if time_ratio <= 1.5 else 'FAIL'}")
        print(f"RSS ratio hpa/file:     {rss_ratio:.2f} (bar 1.2)  {'PASS' if rss_ratio <= 1.2 else 'FAIL'}")
        print(f"with --with-linear: time ratio {best['hpa-with-linear'] / best['loadmat']:.2f}, "
              f"RSS ratio {peak['hpa-with-linear'] / size:.2f}")
    finally:
        if not args.keep and path.exists():
            path.unlink()


if __name__ == "__main__":
    main()
