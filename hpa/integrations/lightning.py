"""``HPACallback`` for PyTorch Lightning: an ``hpa train`` run folder from ``Trainer.fit``.

::

    trainer = lightning.pytorch.Trainer(max_epochs=10, callbacks=[HPACallback("runs/mine", input_size=(3, 32, 32))])

Epoch 0 is recorded at ``on_fit_start`` (before the first step), each epoch at
``on_train_epoch_end`` (after that epoch's validation) with ``trainer.callback_metrics``,
what the module logged, as its metrics.  The run is closed when the fit ends, and marked
incomplete when it fails.  Under Lightning's DDP strategy every rank calls it and rank 0
writes.  A logged name that hpa writes itself (``epoch``) is recorded as ``logged_epoch``.
"""

from __future__ import annotations

from typing import Any, Iterable

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:
    raise ImportError("hpa.integrations.lightning needs PyTorch Lightning: pip install 'hpa[lightning]'") from None

import hpa
from hpa.integrations._common import logged

__all__ = ["HPACallback"]


class HPACallback(Callback):
    """Records the fitted module into the new run folder ``out``; the arguments are :class:`hpa.Tracker`'s."""

    def __init__(self, out, *, input_size, statistics: Iterable[str] = ("projection",), every: int = 1,
                 log: Iterable[str] = (), name: str | None = None, seed: int | None = None,
                 figures: bool = True) -> None:
        self.out = out
        self.options = dict(input_size=input_size, statistics=tuple(statistics), every=every, log=tuple(log),
                            name=name, seed=seed, figures=figures)
        self.tracker = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.tracker = hpa.Tracker(pl_module, self.out, **self.options)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.tracker.epoch(trainer.current_epoch + 1, metrics=logged(trainer.callback_metrics))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.tracker.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.tracker is not None:
            self.tracker.close("incomplete")

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing to checkpoint: the run folder is the record
