"""Experiments: training tasks, the trainer and its run directory.

The flow is task -> dataset -> trainer -> snapshots (+ metrics) -> analysis.
Importing this package stays torch-free, so a task plugin that only declares a
:class:`Task` is cheap to load; the trainer imports torch when it runs.
"""

from hpa.experiments.types import Dataset, FileDataset, Noise, Recipe, Task, data_root

__all__ = ["Dataset", "FileDataset", "Noise", "Recipe", "Task", "data_root"]
