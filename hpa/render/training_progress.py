"""Progress of ``hpa train`` on stderr.

On a terminal each epoch gets a live tqdm bar: images done, throughput, the
epoch's time left, the time left for the whole run, and the loss and accuracy
of the last finished epoch (the loop keeps its running sums on the device, so
reading them per batch would cost a host sync).  When the epoch ends the bar
gives way to the epoch's plain line, so the terminal keeps one line per epoch.
Anywhere else (a log, a pipe, CI) only the plain lines are written.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from hpa.render.progress import format_seconds


class TrainingProgress:
    """The trainer's ``progress``: call it with a line; ``epoch_started``/``advance`` drive the bar."""

    def __init__(self, stream: TextIO | None = None, bars: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.bars = self.stream.isatty() if bars is None else bars
        self.clock = clock
        self.bar = None
        self.durations: list[float] = []  # seconds of the epochs trained by this process
        self.started = 0.0
        self.postfix = ""  # the last finished epoch's loss and accuracy

    def __call__(self, line: str) -> None:
        self._close()
        print(line, file=self.stream, flush=True)

    def epoch_started(self, epoch: int, epochs: int, images: int) -> None:
        """A new bar for 1-based ``epoch`` of ``epochs``, over ``images`` training images."""
        self._close()
        self.started = self.clock()
        if not self.bars or images <= 0:
            return
        from tqdm import tqdm

        left = self._run_left(epochs - epoch + 1)
        self.bar = tqdm(total=images, desc=f"epoch {epoch}/{epochs}", file=self.stream, leave=False,
                        dynamic_ncols=True, unit="img", unit_scale=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {rate_fmt} · epoch {remaining} left"
                                   + (f" · run ~{left} left" if left else "") + "{postfix}",
                        postfix=self.postfix or None)

    def advance(self, images: int) -> None:
        if self.bar is not None:
            self.bar.update(images)

    def epoch_finished(self, line: dict) -> None:
        """Remember the epoch's time and numbers for the next bar."""
        self.durations.append(float(line.get("seconds") or self.clock() - self.started))
        if line.get("train_loss") is not None:
            self.postfix = f"last: loss {line['train_loss']:.3f} acc {line['train_accuracy']:.3f}"
            if line.get("val_accuracy") is not None:
                self.postfix += f" val {line['val_accuracy']:.3f}"

    def close(self) -> None:
        self._close()

    def _run_left(self, epochs_left: int) -> str:
        trained = self.durations[1:] or self.durations  # epoch 0 only evaluates: a poor guide once others exist
        if not trained:
            return ""
        return format_seconds(sum(trained) / len(trained) * epochs_left)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
