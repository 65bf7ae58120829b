"""hpa inside the training loops people use: one callback per framework, each an optional extra.

- :mod:`hpa.integrations.lightning`: ``HPACallback`` for ``lightning.pytorch`` (``pip install 'hpa[lightning]'``);
- :mod:`hpa.integrations.transformers`: ``HPACallback`` for the Hugging Face ``Trainer``
  (``pip install 'hpa[transformers]'``).

Both drive an :class:`hpa.Tracker`, so their run folders are those of ``hpa train``.
Importing ``hpa`` (or this package) imports neither framework.
"""

__all__: list[str] = []  # the callbacks live in the submodules, each behind its optional extra
