"""Progress of ``hpa scan`` on stderr, fed by the library's ``progress(what, done, total)`` callback.

On a terminal each stage with several steps gets a tqdm bar with elapsed time and an
estimate of the time left.  Anywhere else (a log file, a pipe, CI) each stage gets one
plain line when it ends, with its time, so logs never hold carriage-return-joined text.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class StageProgress:
    """A ``progress(what, done, total)`` callback; a new ``what`` starts a new stage.

    ``bars``: tqdm bars (for a terminal); otherwise one line per finished stage.
    Call :meth:`close` (or use it as a context manager) to end the last stage.
    """

    def __init__(self, stream: TextIO | None = None, bars: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.bars = self.stream.isatty() if bars is None else bars
        self.clock = clock
        self.stage: str | None = None
        self.started = 0.0
        self.steps = 0  # the stage's total, for its closing line
        self.bar = None

    def __call__(self, what: str, done: int, total: int) -> None:
        if self.stage == f"statistic {what}":  # hpa.analyse announces a statistic before it reports steps
            self.stage = what
        if what != self.stage:
            self._end_stage()
            self.stage, self.started, self.steps = what, self.clock(), total
        self.steps = max(self.steps, total)
        if self.bars and total > 1:
            self._update_bar(what, done, total)

    def note(self, text: str) -> None:
        """A line of its own, such as an estimate, before the next stage (it ends the current one)."""
        self.close()
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        self._end_stage()
        self.stage = None

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _update_bar(self, what: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=what, file=self.stream, leave=False, dynamic_ncols=True,
                            unit="step", bar_format="{desc}: {n}/{total} |{bar}| {elapsed}<{remaining}")
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def _end_stage(self) -> None:
        if self.stage is None:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        steps = f" ({self.steps} steps)" if self.steps > 1 else ""
        print(f"{self.stage}{steps}: {format_seconds(self.clock() - self.started)}", file=self.stream, flush=True)


def format_seconds(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``3 min 05 s``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"
