"""The one error hierarchy of hpa.

Every message is written for the person at the terminal: it names what went
wrong and, where there is one, the fix.  The CLI prints ``str(error)`` on one
line and exits with status 2; ``HPA_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable


class HpaError(Exception):
    """Base class: bad input or a request hpa cannot satisfy."""


class SpecError(HpaError):
    """A model spec names an unknown loader, model or file type."""


class LoadError(HpaError):
    """A model file or download exists but cannot be turned into a graph."""


class UnsafeFileError(LoadError):
    """Loading would execute code stored in the file (a pickle) and the user has not allowed it."""


class UnsupportedModelError(HpaError):
    """The model loaded, but hpa cannot analyse it (for example it has no conv layers)."""


class OptionError(HpaError):
    """An option value is malformed or does not apply."""


class UnknownOptionError(OptionError, TypeError):
    """An option or keyword argument that nothing declares (a TypeError too, as Python's own for a bad keyword)."""


class PluginError(HpaError):
    """A plugin registered something invalid, or two plugins claim the same name."""


class OutputError(HpaError):
    """An output folder or file cannot be written, or writing it would touch files hpa did not write."""


class NonFiniteWeightsError(HpaError):
    """The scan finished, but some layers hold NaN or Inf weights.

    Raised by the CLI after all output has been written, so that scripts notice
    a damaged checkpoint; the library reports the same facts per layer.
    """


class TrainingError(HpaError):
    """Training stopped: the loss became NaN or Inf.  Finished epochs are kept."""


class ReinitError(HpaError):
    """Bad input to ``hpa reinit``: nothing to reset, or nothing to evaluate on."""


class HpaWarning(UserWarning):
    """Warnings hpa emits about plugins and data (shown once, on stderr)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C: the finished epochs are kept and run.json says "interrupted".

    A KeyboardInterrupt still (so that nothing catches it as an error); its message is the one
    line that says how to continue, which the CLI prints before exiting with status 130.
    """

    @classmethod
    def of(cls, folder: Path) -> TrainingInterrupted:
        return cls(f"Stopped by Ctrl-C; the finished epochs are kept in {folder}: continue with "
                   f"'hpa train --resume {folder}'")


# -- the "did you mean" every refusal of a name ends with --------------------------------

def suggest(name: str, choices: Iterable[str], what: str = "") -> str:
    """A '; did you mean ...?' tail for error messages, or '' when nothing is close.

    Names that start with ``name`` come first (``vit_tiny`` -> ``vit_tiny_patch16_224``),
    shortest first; then close spellings; then, for names of 4 or more characters,
    names that contain it.
    """
    choices = list(choices)
    lowered = name.lower()
    close = sorted((c for c in choices if len(lowered) >= 2 and c.lower().startswith(lowered) and c != name),
                   key=lambda c: (len(c), c))[:3]
    if not close:
        close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    if not close and len(lowered) >= 4:
        close = [c for c in choices if lowered in c.lower()][:3]
    if close:
        return "; did you mean " + " or ".join(repr(what + c) for c in close) + "?"
    if choices and len(choices) <= 12:
        return "; choose from " + ", ".join(sorted(choices))
    return ""
