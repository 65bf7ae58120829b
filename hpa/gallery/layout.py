"""The names inside a gallery folder: the one place that knows them.

    DIR/gallery.json             the scan settings and the specs given so far
    DIR/gallery.csv              one row per model (hpa.gallery.summary)
    DIR/coverage.txt             the coverage line, then the failures by reason
    DIR/not_cached.txt           the models whose weights are not cached, and the command filling each
    DIR/figures/                 n_l against relative depth: every model, and one panel per family
    DIR/models/<key>/model.json  each model's record: what was scanned, its layers' counts, or why it failed
    DIR/models/<key>/result.json the model's full scan (hpa plot redraws its figures), when it succeeded

Every folder is written whole and atomically with its own manifest (hpa.files); the top level lists
its files in its manifest and vouches for the folders by theirs (``foreign_entry(..., nested=True)``).
"""

from __future__ import annotations

from pathlib import Path

REQUEST = "gallery.json"
TABLE = "gallery.csv"
COVERAGE = "coverage.txt"
NOT_CACHED = "not_cached.txt"
FIGURES = "figures"
MODELS = "models"
RECORD = "model.json"
RESULT = "result.json"
#: The top-level files a gallery writes (its manifest lists those present).
TOP_FILES = (REQUEST, TABLE, COVERAGE, NOT_CACHED)


def model_folder(out: Path, key: str) -> Path:
    return Path(out) / MODELS / key
