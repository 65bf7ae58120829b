"""Benchmark of the cone statistics: full VGG-19 at 32x32, every eligible pair, rotation included.

Measures
  * the wall and CPU time of every eligible layer pair (targets: <= 60 s on a
    2-core CPU, <= 2 s on an H100), and of the whole ``hpa.scan`` end to end;
  * the per-pair speed ratio against the oracle of ``tests/test_cones.py``
    (the spec computed literally, one Python loop per pair, rotation over all
    D shifts with ``np.roll``), timed on a sample of pairs from every layer
    pair and extrapolated (target >= 1000x).

Usage: ``python benchmarks/bench_cones.py [--device auto|cpu|cuda] [--input 32]
[--memory-mb 512] [--sample 24] [--threads N] [--json out.json]``.  torchvision's VGG-19 is
built with random weights (no download); at 32x32 its last block runs on a
2x2 plane, where a 3x3 kernel does not fit, so those pairs are listed as
skipped, as the spec requires.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def load_oracle():
    spec = importlib.util.spec_from_file_location("_cones_oracle", ROOT / "tests" / "test_cones.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.oracle


def sample_pair(lower_w, lower_b, upper_w, upper_b, cones_wanted: int, predecessors: int):
    """A sub-problem of the layer pair: a few cones, each with ``predecessors`` of its predecessors."""
    n_i = max(1, min(upper_w.shape[0], cones_wanted // 2))
    n_o = max(1, min(upper_w.shape[1], 2))
    n_p = max(1, min(lower_w.shape[1], predecessors))
    return lower_w[:n_o, :n_p], lower_b[:n_o, :n_p], upper_w[:n_i, :n_o], upper_b[:n_i, :n_o], n_i * n_o * n_p


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--input", type=int, default=32, help="input side (default 32)")
    parser.add_argument("--memory-mb", type=float, default=512.0)
    parser.add_argument("--sample", type=int, default=24, help="oracle pairs timed per layer pair")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    import torch
    import torchvision

    import hpa
    from hpa import cones
    from hpa_plugins.cones import find_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.vgg19(weights=None).eval()
    size = (3, args.input, args.input)
    device = cones.resolve_device(args.device)
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"device: {device} ({where}), torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")

    graph = hpa.load(model, input_size=size)
    pairs, skipped = find_pairs(graph, {})
    print(f"VGG-19 at {args.input}x{args.input}: {len(pairs)} eligible pairs, {len(skipped)} skipped entries")
    oracle = load_oracle()

    rows = []
    total_wall = total_cpu = oracle_total = 0.0
    for lower, upper, plane in pairs:
        lw, up_w = np.asarray(lower.weight, np.float64), np.asarray(upper.weight, np.float64)
        lb, _ = cones.channel_biases(lower.weight, lower.bias, lower.channel_bias)
        ub, _ = cones.channel_biases(upper.weight, upper.bias, upper.channel_bias)
        n_pairs = up_w.shape[0] * up_w.shape[1] * lw.shape[1]
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        cones.cone_pair_statistics(lw, lb, up_w, ub, upper.groups or 1, plane, device=device,
                                   memory_mb=args.memory_mb)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        total_wall += wall
        total_cpu += cpu
        # the oracle on a sample of the same layer pair (same plane, same kernels)
        sl_w, sl_b, su_w, su_b, n_sample = sample_pair(lw, lb, up_w, ub, 4, max(1, args.sample // 4))
        start = time.perf_counter()
        oracle(sl_w, sl_b, su_w, su_b, 1, plane)
        oracle_per_pair = (time.perf_counter() - start) / n_sample
        oracle_total += oracle_per_pair * n_pairs
        row = {"lower": lower.name, "upper": upper.name, "plane": list(plane), "pairs": n_pairs,
               "seconds": wall, "cpu_seconds": cpu, "pairs_per_second": n_pairs / wall,
               "oracle_seconds_per_pair": oracle_per_pair, "speedup": oracle_per_pair * n_pairs / wall}
        rows.append(row)
        print(f"  {lower.name:>12} -> {upper.name:<12} {plane[0]:>3}x{plane[1]:<3} {n_pairs / 1e6:8.2f}M pairs "
              f"{wall:7.2f} s (cpu {cpu:6.2f} s)  {n_pairs / wall / 1e6:7.2f}M pairs/s  "
              f"oracle {oracle_per_pair * 1e6:8.1f} us/pair  x{row['speedup']:,.0f}")

    all_pairs = sum(r["pairs"] for r in rows)
    start = time.perf_counter()
    hpa.scan(model, statistics=["cones"], input_size=size, cones_device=args.device, cones_memory_mb=args.memory_mb)
    scan_wall = time.perf_counter() - start
    figures = {
        "device": str(device), "input": args.input, "eligible_pairs": len(rows), "cone_pairs": all_pairs,
        "seconds": total_wall, "cpu_seconds": total_cpu, "scan_seconds": scan_wall,
        "pairs_per_second": all_pairs / total_wall,
        "oracle_seconds_extrapolated": oracle_total, "speedup": oracle_total / total_wall,
        "min_pair_speedup": min(r["speedup"] for r in rows), "load_average": os.getloadavg()[0], "pairs": rows,
    }
    print(f"all {len(rows)} pairs ({all_pairs / 1e6:.1f}M cone-predecessor pairs): {total_wall:.2f} s wall, "
          f"{total_cpu:.2f} s CPU; hpa.scan end to end {scan_wall:.2f} s")
    print(f"oracle, extrapolated from samples: {oracle_total / 3600:.1f} h -> speed ratio x{figures['speedup']:,.0f} "
          f"overall, at least x{figures['min_pair_speedup']:,.0f} on every layer pair")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
