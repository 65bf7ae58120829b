"""Issue 2 targets, measured in one run (the machine is shared: compare the ratios).

* ``hpa --help`` and ``hpa plugins`` never import torch; target <= 0.3 s.
* The analysis of VGG-19 after loading: target <= 0.5 s.
* Scanning a ~550 MB VGG-19 state_dict: peak RSS minus that of a bare
  ``python -c "import torch"`` <= 1.0x the file size.

Run: .venv/bin/python benchmarks/bench_core.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _measure import run_python, wall  # noqa: E402

DATA = Path(__file__).parent / "data"
HPA = [sys.executable, "-m", "hpa"]


def startup() -> None:
    bare = wall([sys.executable, "-c", "pass"])
    torch_import = wall([sys.executable, "-c", "import torch"], repeat=3)
    for args in (["--help"], ["plugins"]):
        seconds = wall(HPA + args)
        print(f"hpa {' '.join(args):<8} {seconds:.3f} s (target <= 0.3 s; bare python {bare:.3f} s, "
              f"import torch {torch_import:.2f} s; ratio to import torch {seconds / torch_import:.2f})")
    import subprocess

    code = "import sys\nfrom hpa.cli import main\ntry:\n    main(['plugins'])\nexcept SystemExit:\n    pass\n" \
           "print('torch' in sys.modules)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()[-1]
    print(f"torch imported by 'hpa plugins': {found}")


def analysis_time() -> None:
    import hpa

    graph = hpa.load("torchvision:vgg19", weights="none")
    times = sorted(_timed(lambda: hpa.scan(graph, statistics=["projection"])) for _ in range(5))
    with_linear = min(_timed(lambda: hpa.scan(graph, statistics=["projection"], with_linear=True))
                      for _ in range(3))
    print(f"VGG-19 projection analysis after loading: {times[0]:.3f} s best of 5, median {times[2]:.3f} s "
          f"(target <= 0.5 s); with --with-linear {with_linear:.3f} s")
    everything = _timed(lambda: hpa.scan(graph))
    print(f"VGG-19 default scan after loading (projection + cones at 224x224): {everything:.1f} s")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def memory() -> None:
    import torch
    import torchvision

    DATA.mkdir(exist_ok=True)
    path = DATA / "vgg19_state_dict.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(torchvision.models.vgg19().state_dict(), path)
    size_mb = path.stat().st_size / 2**20
    baseline = run_python("import torch")["peak_mb"]
    cases = {
        "hpa scan FILE": f"from hpa.cli import main\nmain(['scan', {str(path)!r}, '--json'])",
        "hpa scan FILE --with-linear": f"from hpa.cli import main\nmain(['scan', {str(path)!r}, '--json', "
                                       f"'--with-linear'])",
        "hpa scan torchvision:vgg19 --weights FILE --stat projection": (
            f"from hpa.cli import main\nmain(['scan', 'torchvision:vgg19', '--weights', {str(path)!r}, "
            f"'--stat', 'projection', '--json'])"),
    }
    print(f"file {size_mb:.0f} MB; bare 'import torch' peak RSS {baseline:.0f} MB")
    for label, body in cases.items():
        found = run_python(body + " \n")
        extra = found["peak_mb"] - baseline
        print(f"{label:<60} peak {found['peak_mb']:.0f} MB, above baseline {extra:.0f} MB = "
              f"{extra / size_mb:.2f}x file size (target <= 1.0x), {found['seconds']:.1f} s")


if __name__ == "__main__":
    os.environ.setdefault("HPA_DISABLE_PLUGIN_AUTOLOAD", "1")
    memory()  # first, before this process grows
    startup()
    analysis_time()
