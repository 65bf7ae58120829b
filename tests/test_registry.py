"""hpa/registry.py on its own: options, routing, registries, spec parsing."""

from __future__ import annotations

import math

import pytest

from hpa.errors import OptionError, PluginError, SpecError, UnknownOptionError
from hpa.registry import (Loader, LoadOptions, Option, Registry, match, parse_spec, resolve_options,
                          route_options, suggest)


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True), (" Yes ", True),
    ("false", False), ("0", False), ("no", False), ("off", False), (True, True), (False, False), (1, True), (0, False),
])
def test_bool_options_accept_the_usual_spellings(text, expected):
    assert Option("flag", bool).convert(text) is expected


@pytest.mark.parametrize("value", ["maybe", "", "2", 2, 0.5, None, "truee"])
def test_bool_options_refuse_anything_else(value):
    with pytest.raises(OptionError, match="option flag must be true or false"):
        Option("flag", bool).convert(value)


@pytest.mark.parametrize("option, value, expected", [
    (Option("n", int), "12", 12), (Option("n", int), " -3 ", -3), (Option("n", int), 7, 7),
    (Option("n", int), 4.0, 4), (Option("x", float), "1e-3", 0.001), (Option("x", float), 3, 3.0),
    (Option("s", str), "cpu", "cpu"),
])
def test_numbers_and_strings_convert(option, value, expected):
    converted = option.convert(value)
    assert converted == expected and type(converted) is type(expected)


@pytest.mark.parametrize("option, value, words", [
    (Option("n", int), "1.5", "an integer"), (Option("n", int), 1.5, "an integer"), (Option("n", int), True, "an integer"),
    (Option("n", int), "abc", "an integer"), (Option("x", float), "abc", "a number"), (Option("x", float), "nan", "a number"),
    (Option("x", float), False, "a number"), (Option("s", str), 3, "a string"),
])
def test_wrong_types_are_refused_with_the_type_named(option, value, words):
    with pytest.raises(OptionError) as info:
        option.convert(value)
    assert words in str(info.value) and repr(value) in str(info.value) and option.name in str(info.value)


def test_choices_are_checked_after_conversion():
    mode = Option("mode", str, "fast", choices=("fast", "exact"))
    assert mode.convert("exact") == "exact"
    with pytest.raises(OptionError, match="must be one of fast, exact, not 'slow'"):
        mode.convert("slow")
    level = Option("level", int, 1, choices=(1, 2, 3))
    assert level.convert("3") == 3
    with pytest.raises(OptionError, match="one of 1, 2, 3"):
        level.convert("4")


def test_a_converter_function_names_what_it_takes_by_its_docstring():
    def even(value):
        """an even integer."""
        number = int(value)
        if number % 2:
            raise ValueError(value)
        return number

    option = Option("pairs", even)
    assert option.convert("4") == 4
    with pytest.raises(OptionError, match="option pairs must be an even integer, not '3'"):
        option.convert("3")
    assert option.describe()["type"] == "an even integer"
    assert Option("n", int, 5, "help", (5, 6)).describe() == {"name": "n", "type": "int", "default": 5,
                                                             "help": "help", "choices": [5, 6]}


def test_resolve_fills_defaults_and_converts_given_values():
    declared = {o.name: o for o in (Option("a", int, 1), Option("b", bool, False), Option("c", float, None))}
    assert resolve_options(declared, {}) == {"a": 1, "b": False, "c": None}
    values = resolve_options(declared, {"b": "yes", "c": "2.5"})
    assert values == {"a": 1, "b": True, "c": 2.5}
    assert not math.isnan(values["c"])


def test_route_sends_each_name_to_its_one_owner():
    owners = {"loader x": {"num_classes": Option("num_classes", int)},
              "statistic s": {"s_bins": Option("s_bins", int)}, "statistic t": {}}
    routed = route_options({"num_classes": "3", "s_bins": 4}, owners)
    assert routed == {"loader x": {"num_classes": "3"}, "statistic s": {"s_bins": 4}, "statistic t": {}}


def test_route_refuses_unknown_names_with_a_close_match_as_a_type_error():
    owners = {"statistic s": {"s_bins": Option("s_bins", int)}}
    with pytest.raises(UnknownOptionError) as info:
        route_options({"skip1x1": True}, owners, known=("skip_1x1", "bins"))
    assert isinstance(info.value, TypeError) and isinstance(info.value, OptionError)
    message = str(info.value)
    assert "unknown option 'skip1x1'" in message and "did you mean 'skip_1x1'?" in message
    assert "statistic s" in message and "\n" not in message
    with pytest.raises(UnknownOptionError, match="unknown option '-o bogus'"):
        route_options({"bogus": 1}, owners, spelled="-o {}")


def test_load_options_spell_the_weights_choices():
    assert LoadOptions().default_weights and not LoadOptions().random_init
    assert LoadOptions(weights="DEFAULT").default_weights and LoadOptions(weights="default").default_weights
    assert LoadOptions(weights="none").random_init and LoadOptions(weights="None").random_init
    named = LoadOptions(weights="IMAGENET1K_V1")
    assert not named.random_init and not named.default_weights


def test_registry_refuses_duplicates_and_bad_names_and_remembers_owners():
    registry = Registry[Loader]("loader", "prefix")
    first = Loader(prefix="abc", load=lambda name, options: None)
    registry.register(first, "plugin_a")
    assert registry.get("abc") is first and registry.owner("abc") == "plugin_a" and "abc" in registry
    with pytest.raises(PluginError, match="plugins plugin_a and plugin_b both register the loader 'abc'"):
        registry.register(Loader(prefix="abc", load=lambda n, o: None), "plugin_b")
    for bad in ("", "a:b", None):
        with pytest.raises(PluginError, match="invalid name"):
            registry.register(Loader(prefix=bad, load=lambda n, o: None), "plugin_c")
    with pytest.raises(SpecError, match="unknown loader 'abd'; did you mean 'abc'"):
        registry.get("abd")
    with pytest.raises(SpecError):
        registry.owner("nothing")
    assert registry.names() == ["abc"] and registry.items() == [first]


def test_suggest_and_match():
    assert suggest("cones", ["cones", "projection"]) == "; did you mean 'cones'?"
    assert suggest("vgg", ["vgg11", "vgg13", "resnet18"], "torchvision:").startswith("; did you mean 'torchvision:vgg1")
    assert suggest("zzz", ["a", "b"]) == "; choose from a, b"
    assert suggest("zzz", [str(i) for i in range(20)]) == ""
    assert match(["vgg11", "resnet18", "vgg13", "vgg11"], "vgg*") == ["vgg11", "vgg13"]
    assert match(["b", "a"], None) == ["a", "b"]


def test_parse_spec_prefixes_and_suffixes(tmp_path):
    registry = Registry[Loader]("loader", "prefix")
    registry.register(Loader(prefix="onnx", load=lambda n, o: None, suffixes=(".onnx",)), "onnx")
    registry.register(Loader(prefix="zoo", load=lambda n, o: None), "zoo")
    assert (parse_spec("zoo:digits", registry).prefix, parse_spec("zoo:digits", registry).name) == ("zoo", "digits")
    assert parse_spec("Model.ONNX", registry).prefix == "onnx"
    with pytest.raises(SpecError, match="unknown loader prefix 'zo'.*did you mean 'zoo'"):
        parse_spec("zo:digits", registry)
