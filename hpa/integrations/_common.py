"""What the callbacks share: a framework's logged values as a Tracker's metrics."""

from __future__ import annotations

from typing import Any, Mapping

from hpa.experiments.layout import RESERVED


def logged(values: Mapping[str, Any]) -> dict[str, Any]:
    """The logged values under their names; a name hpa writes itself (``epoch``) becomes ``logged_epoch``."""
    return {f"logged_{key}" if key in RESERVED else str(key): value for key, value in values.items()}
