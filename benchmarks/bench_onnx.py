"""Speed and memory of the ONNX loader on a 550 MB VGG-19 (issue 3 bars).

    .venv/bin/python benchmarks/bench_onnx.py [--repeat 3] [--clean]

Builds once, cached under ``benchmarks/data/``, a VGG-19 with torchvision's
random init exported by ``torch.onnx.export`` (legacy exporter) to a single
``.onnx`` file with the weights inside (no external data, the common case and
the harder one for memory), a copy of the same model saved with external
data beside it, and a copy whose whole network sits in the ``then`` branch of
an ``If`` with every weight a ``Constant`` node inside the branch (as spox
writes per-sample-rate models), so that subgraph weights are held to the same bars.  Then, each in a fresh subprocess with the file in the page
cache:

* ``onnx.load(path)`` alone;
* ``hpa.scan(path, statistics=["projection"])``: load, shapes, graph, projection
  (conv layers only, the default, and with ``with_linear=True``, which reads
  every weight of the file, the classifier's 120M included).

Time is wall-clock of that call.  Memory is the peak RSS (``VmHWM``, reset
after the imports through ``/proc/self/clear_refs``) minus the RSS once the
libraries are imported (the hpa child first scans a tiny model so every lazy
import is done), as a ratio to the model's size on disk.

Bars: hpa time <= 1.5x onnx.load time; hpa peak RSS above baseline <= 1.2x file size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
SINGLE = DATA / "vgg19.onnx"
EXTERNAL = DATA / "vgg19_external" / "vgg19.onnx"
BRANCH = DATA / "vgg19_branch.onnx"

_MEMORY = """
import os, time
def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
"""

_ONNX_CHILD = _MEMORY + """
import sys, json, onnx, numpy
path = sys.argv[1]
_reset_peak(); base = _status("VmRSS")
t0 = time.perf_counter()
model = onnx.load(path)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak": _status("VmHWM") - base, "base": base}))
"""

_HPA_CHILD = _MEMORY + """
import sys, json, warnings
warnings.simplefilter("ignore")
import hpa
path, tiny, with_linear = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
hpa.scan(tiny, statistics=["projection"], with_linear=with_linear)  # every lazy import, once
_reset_peak(); base = _status("VmRSS")
t0 = time.perf_counter()
result = hpa.scan(path, statistics=["projection"], with_linear=with_linear)
seconds = time.perf_counter() - t0
layers = len(result.graph.layers)
print(json.dumps({"seconds": seconds, "peak": _status("VmHWM") - base, "base": base, "layers": layers}))
"""


def build() -> None:
    """Export VGG-19 (random init) once: a single file, and a copy with external data."""
    if SINGLE.exists() and EXTERNAL.exists() and BRANCH.exists():
        return
    import warnings

    import onnx
    import torch
    import torchvision

    DATA.mkdir(parents=True, exist_ok=True)
    if not SINGLE.exists():
        print("exporting VGG-19 (random init) to", SINGLE, file=sys.stderr)
        torch.manual_seed(0)
        model = torchvision.models.vgg19(weights=None).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(SINGLE), dynamo=False)
        del model
    if not EXTERNAL.exists():
        EXTERNAL.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(onnx.load(str(SINGLE)), str(EXTERNAL), save_as_external_data=True,
                  all_tensors_to_one_file=True, location="vgg19.weights", size_threshold=1024)
    if not BRANCH.exists():
        _write_branch_copy(SINGLE, BRANCH)
    tiny = DATA / "tiny.onnx"
    if not tiny.exists():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(tiny), dynamo=False)


def _write_branch_copy(source: Path, target: Path) -> None:
    """The model of ``source`` inside the then branch of an If, its initializers Constant nodes there."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(source))
    graph = model.graph
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer]
    out = graph.output[0].name
    then = helper.make_graph(constants + list(graph.node), "then", [],
                             [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", [graph.input[0].name], ["passthrough"])], "else", [],
                              [helper.make_tensor_value_info("passthrough", TensorProto.FLOAT, None)])
    branchy = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="If_0", then_branch=then, else_branch=other)], "branchy",
        [graph.input[0], helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(branchy, opset_imports=model.opset_import, ir_version=model.ir_version),
              str(target))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file()) if path == EXTERNAL \
        else path.stat().st_size


def _warm_cache(path: Path) -> None:
    for p in (path.parent.iterdir() if path == EXTERNAL else [path]):
        with open(p, "rb") as handle:
            while handle.read(1 << 24):
                pass


def _child(code: str, *args: str) -> dict:
    env = dict(os.environ, HPA_DISABLE_PLUGIN_AUTOLOAD="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", ""))
    env = {k: v for k, v in env.items() if v != ""}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(path: Path, repeat: int, with_linear: bool) -> dict:
    size = _size(path)
    _warm_cache(path)
    onnx_runs = [_child(_ONNX_CHILD, str(path)) for _ in range(repeat)]
    hpa_runs = [_child(_HPA_CHILD, str(path), str(DATA / "tiny.onnx"), "1" if with_linear else "0")
                for _ in range(repeat)]
    onnx_s = statistics.median(r["seconds"] for r in onnx_runs)
    hpa_s = statistics.median(r["seconds"] for r in hpa_runs)
    onnx_peak = max(r["peak"] for r in onnx_runs)
    hpa_peak = max(r["peak"] for r in hpa_runs)
    return {
        "file": str(path), "size_mb": size / 2**20, "layers": hpa_runs[0]["layers"],
        "onnx_load_s": onnx_s, "hpa_scan_s": hpa_s, "time_ratio": hpa_s / onnx_s,
        "onnx_load_peak_mb": onnx_peak / 2**20, "hpa_peak_mb": hpa_peak / 2**20,
        "onnx_load_peak_ratio": onnx_peak / size, "hpa_peak_ratio": hpa_peak / size,
        "hpa_baseline_rss_mb": hpa_runs[0]["base"] / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="fresh subprocesses per measurement (median time)")
    parser.add_argument("--clean", action="store_true", help="delete this benchmark's files afterwards")
    args = parser.parse_args()
    build()
    ok = True
    cases = [("single file", SINGLE, False), ("single file, --with-linear (every weight read)", SINGLE, True),
             ("external data", EXTERNAL, False), ("external data, --with-linear", EXTERNAL, True),
             ("inside an If branch, Constant weights", BRANCH, False)]
    for label, path, with_linear in cases:
        r = measure(path, args.repeat, with_linear)
        time_ok, memory_ok = r["time_ratio"] <= 1.5, r["hpa_peak_ratio"] <= 1.2
        ok &= time_ok and memory_ok
        print(f"VGG-19 ONNX, {label}: {r['size_mb']:.0f} MB, {r['layers']} layers")
        print(f"  onnx.load            {r['onnx_load_s']:7.3f} s   peak +{r['onnx_load_peak_mb']:6.0f} MB "
              f"({r['onnx_load_peak_ratio']:.2f}x file)")
        print(f"  hpa load+projection  {r['hpa_scan_s']:7.3f} s   peak +{r['hpa_peak_mb']:6.0f} MB "
              f"({r['hpa_peak_ratio']:.2f}x file)   baseline RSS {r['hpa_baseline_rss_mb']:.0f} MB")
        print(f"  time ratio {r['time_ratio']:.2f} (bar 1.5: {'ok' if time_ok else 'FAIL'})   "
              f"memory ratio {r['hpa_peak_ratio']:.2f} (bar 1.2: {'ok' if memory_ok else 'FAIL'})")
    if args.clean:
        SINGLE.unlink(missing_ok=True)
        BRANCH.unlink(missing_ok=True)
        (DATA / "tiny.onnx").unlink(missing_ok=True)
        shutil.rmtree(EXTERNAL.parent, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
