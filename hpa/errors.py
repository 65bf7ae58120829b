"""The one error hierarchy of hpa.

Every message is written for the person at the terminal: it names what went
wrong and, where there is one, the fix.  The CLI prints ``str(error)`` on one
line and exits with status 2; ``HPA_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations


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
