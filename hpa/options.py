"""Options: what every loader understands (:class:`LoadOptions`), what a plugin declares
(:class:`Option`), and the routing of ``-o NAME=VALUE`` pairs to the one owner declaring each.

Conversion, validation and the "did you mean" of an unknown option are decided here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from hpa.errors import OptionError, UnknownOptionError, suggest


@dataclass(frozen=True)
class LoadOptions:
    """Options every loader understands.  The CLI flags have the same names."""

    # As the loader sees it: None (or "DEFAULT"): the loader's pretrained or shipped weights;
    # "none": no pretrained weights, a seeded random init; otherwise a weights name or a file path.
    # hpa.load maps its Python spelling (weights=None: random init, as in torchvision and timm;
    # the default "DEFAULT") onto this; loaders should test random_init and default_weights.
    weights: str | None = None
    input_size: tuple[int, ...] | None = None  # (C, H, W) without batch; None: from the model's config
    fold_bn: bool = True  # fold inference BatchNorm into the conv before it (docs/statistics.md §0)
    trust_pickle: bool = False  # allow unpickling code from a file; never on by default
    seed: int = 0  # seed of random initialisations
    # The loader's declared options (Loader.options), converted and validated, defaults filled in.
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def random_init(self) -> bool:
        """True when no pretrained weights are wanted (``hpa.load(weights=None)``, ``--weights none``)."""
        return isinstance(self.weights, str) and self.weights.lower() == "none"

    @property
    def default_weights(self) -> bool:
        """True when the loader's own pretrained or shipped weights are wanted (``"DEFAULT"``)."""
        return self.weights is None or (isinstance(self.weights, str) and self.weights.upper() == "DEFAULT")


_TRUE = ("true", "1", "yes", "on")


_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Option:
    """One option a loader, statistic or task declares; ``-o NAME=VALUE`` on the CLI.

    The core routes each key to the one plugin that declares it, converts the CLI
    string with ``type`` and refuses unknown keys with a "did you mean".
    A ``default`` of None means "not given": the owner then uses its own behaviour.
    """

    name: str  # the -o key and the hpa.load/hpa.scan keyword, snake_case
    type: Callable[[Any], Any] = str  # bool, int, float, str, or a converter raising ValueError
    default: Any = None
    help: str = ""  # one line
    choices: tuple[Any, ...] = ()  # allowed values after conversion; empty: any

    def convert(self, value: Any) -> Any:
        """``value`` (a CLI string or a Python value) as this option's type; OptionError if it is not one."""
        try:
            converted = self._convert(value)
        except (TypeError, ValueError):
            raise OptionError(f"option {self.name} must be {self.type_name()}, not {value!r}") from None
        if self.choices and converted not in self.choices:
            raise OptionError(f"option {self.name} must be one of {', '.join(map(str, self.choices))}, "
                              f"not {value!r}")
        return converted

    def _convert(self, value: Any) -> Any:
        if self.type is bool:
            return _to_bool(value)
        if self.type is int and (isinstance(value, bool) or isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)  # int("1.5") fails, int(1.5) would truncate silently
        if self.type is float and isinstance(value, bool):
            raise ValueError(value)
        if self.type is str and not isinstance(value, str):
            raise ValueError(value)
        if self.type in (int, float) and isinstance(value, str):
            value = value.strip()
        converted = self.type(value)
        if self.type is float and converted != converted:  # NaN passes float() but is never meant
            raise ValueError(value)
        return converted

    def type_name(self) -> str:
        """The type as messages say it; for a converter function, its docstring's first line."""
        known = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        if self.type in known:
            return known[self.type]
        doc = (getattr(self.type, "__doc__", None) or "").strip()  # a converter's first line says what it takes
        return doc.splitlines()[0].rstrip(".") if doc else getattr(self.type, "__name__", "valid")

    def describe(self) -> dict[str, Any]:
        """JSON-ready: name, type, default, help, choices (for ``hpa plugins --json``)."""
        type_name = self.type.__name__ if self.type in (bool, int, float, str) else self.type_name()
        return {"name": self.name, "type": type_name,
                "default": self.default, "help": self.help, "choices": list(self.choices)}


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(value)


def resolve_options(declared: Mapping[str, Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """Every declared option: the given value converted and validated, or the default.

    ``given`` must hold only declared names (route first with :func:`route_options`).
    """
    values = {name: option.default for name, option in declared.items()}
    for name, value in given.items():
        values[name] = declared[name].convert(value)
    return values


def route_options(given: Mapping[str, Any], owners: Mapping[str, Mapping[str, Option]],
                  known: Iterable[str] = (), spelled: str = "{}", what: str = "option") -> dict[str, dict[str, Any]]:
    """Split ``given`` between its owners: owner -> {name: value}, each name to the one owner declaring it.

    ``owners`` maps an owner's label (e.g. "loader torchvision", "statistic cones") to
    the options it declares.  A name no owner declares raises UnknownOptionError with a
    "did you mean" over the declared names and ``known`` (the caller's own keywords);
    ``spelled`` formats a name for the message ("-o {}" on the command line).
    """
    routed: dict[str, dict[str, Any]] = {owner: {} for owner in owners}
    for name, value in given.items():
        owner = next((o for o, declared in owners.items() if name in declared), None)
        if owner is None:
            choices = [n for declared in owners.values() for n in declared] + list(known)
            where = ", ".join(owners) or "nothing that takes options"
            raise UnknownOptionError(f"unknown {what} {spelled.format(name)!r}{suggest(name, choices)} "
                                     f"(options go to: {where}; 'hpa plugins' lists them)")
        routed[owner][name] = value
    return routed
