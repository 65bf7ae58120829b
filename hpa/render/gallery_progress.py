"""Progress of ``hpa gallery`` on stderr: models done, failed, and the time left.

On a terminal a tqdm bar; anywhere else (a log, a pipe) a plain line every 5 % of the models or every
minute, whichever comes first, so that a log of a long gallery shows its pace without carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Mapping, TextIO

from hpa.render.progress import format_seconds


class GalleryProgress:
    """``on_plan(to_scan, kept)`` then ``progress(record)`` of hpa.gallery.run_gallery; :meth:`close` at the end."""

    def __init__(self, stream: TextIO | None = None, bars: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, every_seconds: float = 60.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.bars = self.stream.isatty() if bars is None else bars
        self.clock = clock
        self.every_seconds = every_seconds
        self.total = self.done = self.failed = 0
        self.started = self.last_line = 0.0
        self.bar = None

    def on_plan(self, to_scan: int, kept: int) -> None:
        self.total, self.started = to_scan, self.clock()
        self.last_line = self.started
        kept_text = f"; {kept} already in the folder, kept" if kept else ""
        print(f"gallery: {to_scan} models to scan{kept_text}", file=self.stream, flush=True)
        if self.bars and to_scan:
            from tqdm import tqdm

            self.bar = tqdm(total=to_scan, desc="gallery", file=self.stream, dynamic_ncols=True, leave=False,
                            unit="model", bar_format="{desc}: {n}/{total} done, {postfix} |{bar}| "
                                                     "{elapsed}<{remaining}")
            self.bar.set_postfix_str("0 failed")

    def __call__(self, record: Mapping[str, Any]) -> None:
        self.done += 1
        self.failed += record.get("status") != "ok"
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.failed} failed", refresh=False)
            self.bar.update(1)
            return
        now = self.clock()
        step = max(1, self.total // 20)
        if self.done == self.total or self.done % step == 0 or now - self.last_line >= self.every_seconds:
            self.last_line = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        elapsed = now - self.started
        left = elapsed / self.done * (self.total - self.done) if self.done else None
        eta = "" if left is None or self.done == self.total else f", about {format_seconds(left)} left"
        return (f"gallery: {self.done} of {self.total} done, {self.failed} failed, "
                f"{format_seconds(elapsed)}{eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            print(self.line(self.clock()), file=self.stream, flush=True)
