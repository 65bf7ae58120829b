"""``HPACallback`` for the Hugging Face ``Trainer``: an ``hpa train`` run folder from ``Trainer.train()``.

::

    trainer = transformers.Trainer(model, args, ..., callbacks=[HPACallback("runs/mine", input_size=(3, 32, 32))])

Epoch 0 is recorded at ``on_train_begin``.  Training by epochs (``save_strategy`` other
than "steps"), each epoch is recorded after it ends; training by steps, every ``save_steps``
steps and the last step (where the Trainer saves), numbered 1, 2, ... in the run folder with
the trainer's ``step`` in the metrics line.  A snapshot is taken while the weights are those
of the epoch's (or step's) end: after the evaluation that follows it when there is one, so
that its ``eval_*`` values are in the same line, else before the next step.  The metrics are
what the trainer logged since the previous record (the latest value of each name; its
fractional ``epoch`` as ``logged_epoch``).  Under DDP every rank calls it and rank 0 writes.
"""

from __future__ import annotations

from typing import Iterable

try:
    from transformers import TrainerCallback
except ImportError:
    raise ImportError("hpa.integrations.transformers needs Hugging Face transformers: "
                      "pip install 'hpa[transformers]'") from None

import hpa
from hpa.integrations._common import logged

__all__ = ["HPACallback"]


class HPACallback(TrainerCallback):
    """Records the trained model into the new run folder ``out``; the arguments are :class:`hpa.Tracker`'s."""

    def __init__(self, out, *, input_size, statistics: Iterable[str] = ("projection",), every: int = 1,
                 log: Iterable[str] = (), name: str | None = None, seed: int | None = None,
                 figures: bool = True) -> None:
        self.out = out
        self.options = dict(input_size=input_size, statistics=tuple(statistics), every=every, log=tuple(log),
                            name=name, seed=seed, figures=figures)
        self.tracker = None
        self.pending: int | None = None  # the number of the record whose weights are the model's now
        self.by_steps, self.saves, self.logged_until = False, 0, 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.tracker = hpa.Tracker(model, self.out, **self.options)
        self.by_steps = str(getattr(args.save_strategy, "value", args.save_strategy)) == "steps"
        self.logged_until = len(state.log_history)

    def on_step_end(self, args, state, control, **kwargs):
        last = state.max_steps and state.global_step >= state.max_steps  # saved too, as the Trainer does
        if self.by_steps and (last or (args.save_steps and state.global_step % args.save_steps == 0)):
            self.saves += 1
            self.pending = self.saves

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self.by_steps:  # a step's record waits for the evaluation that may follow the epoch's end
            self.pending = int(round(state.epoch))

    def on_evaluate(self, args, state, control, **kwargs):
        self._flush(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._flush(state)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._flush(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._flush(state)
        self.tracker.close()

    def _flush(self, state) -> None:
        """Record the pending epoch (or save) with what was logged since the previous record."""
        if self.pending is None or self.tracker is None:
            return
        values: dict = {}
        for entry in state.log_history[self.logged_until:]:
            values.update(entry)
        self.logged_until = len(state.log_history)
        if self.by_steps:
            values["step"] = state.global_step
        self.tracker.epoch(self.pending, metrics=logged(values))
        self.pending = None
