"""Options: declared by their owners, routed, converted, validated, refused with a "did you mean".

Bad input goes through the real ``hpa`` command: one stderr line, exit 2, no
traceback, nothing on stdout, nothing written.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import hpa
from conftest import assert_bad_input
from hpa.graph import ConvGraph, Layer
from hpa.errors import OptionError, UnknownOptionError
from hpa.options import LoadOptions, Option, resolve_options, route_options
from hpa.registry import Loader, Statistic, StatisticResult

# (arguments after "scan", words the one stderr line must hold)
BAD_OPTIONS = [
    (["zoo:digits_cnn", "-o", "bogus=1"], ["unknown option 'bogus'", "hpa plugins"]),
    (["torchvision:vgg11", "-o", "num_clases=10"], ["unknown option 'num_clases'", "did you mean 'num_classes'"]),
    (["zoo:digits_cnn", "-o", "num_classes=10"], ["unknown option 'num_classes'", "loader zoo"]),
    (["model.onnx", "-o", "cones_devise=cpu"], ["unknown option 'cones_devise'", "did you mean 'cones_device'"]),
    (["zoo:digits_cnn", "-o", "cones_memory_mb=abc"], ["cones_memory_mb", "positive number", "'abc'"]),
    (["zoo:digits_cnn", "-o", "cones_memory_mb=-5"], ["cones_memory_mb", "positive number"]),
    (["zoo:digits_cnn", "-o", "cones_rotation=maybe"], ["cones_rotation", "true or false"]),
    (["zoo:digits_cnn", "-o", "cones_device=gpu"], ["cones_device", "auto, cpu, cuda or cuda:N", "'gpu'"]),
    (["torchvision:vgg11", "-o", "num_classes=ten"], ["num_classes", "an integer", "'ten'"]),
    (["torchvision:vgg11", "-o", "num_classes=2.5"], ["num_classes", "an integer"]),
    (["torchvision:resnet18", "--weights", "none", "-o", "dropout=0.5"], ["resnet18 does not take -o dropout"]),
    (["zoo:digits_cnn", "-o", "cones_device"], ["-o expects KEY=VALUE", "'cones_device'"]),
    (["zoo:digits_cnn", "-o", "=cpu"], ["-o expects KEY=VALUE"]),
    (["zoo:digits_cnn", "-o", "cones_device=cpu", "-o", "cones_device=auto"], ["cones_device", "given twice"]),
    (["zoo:digits_cnn", "-o", "skip_1x1=true"], ["--skip-1x1"]),
    (["zoo:digits_cnn", "-o", "statistics=cones"], ["--stat"]),
    (["zoo:digits_cnn", "--stat", "projection", "-o", "cones_device=cpu"],
     ["cones_device", "belongs to the statistic cones", "--stat cones"]),
    (["zoo:digits_cnn", "--stat", "cone"], ["unknown statistic 'cone'", "did you mean 'cones'"]),
    (["zooo:digits_cnn"], ["unknown loader prefix 'zooo'", "did you mean 'zoo'"]),
]


@pytest.mark.parametrize("args, words", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_are_one_line_and_exit_2(run_hpa, tmp_path, args, words):
    proc = run_hpa("scan", *args, "--out", tmp_path / "out")
    assert_bad_input(proc, *words)
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []  # nothing written, no .partial


def test_a_statistic_option_no_longer_reaches_the_model_builder(run_hpa):
    # issue 7 §4: cones_device used to go to the torchvision constructor, which crashed
    proc = run_hpa("scan", "torchvision:squeezenet1_1", "--weights", "none", "--input-size", "3,32,32",
                   "--stat", "cones", "-o", "cones_device=cpu", "-o", "cones_rotation=no", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["options"]["cones_device"] == "cpu" and result["options"]["cones_rotation"] is False
    assert result["options"]["cones_memory_mb"] == 512.0  # the declared default, filled in


def test_a_declared_builder_keyword_reaches_the_builder():
    graph = hpa.load("torchvision:squeezenet1_1", weights=None, input_size=(3, 64, 64), num_classes="7")
    assert graph["classifier.1"].weight.shape == (7, 512, 1, 1)


# -- routing, seen from the plugins' side ----------------------------------------------------------

def _recording_plugin(seen: dict):
    """A loader and a statistic that record the options each one receives."""

    def load(name, options):
        seen["loader"] = dict(options.extra)
        return ConvGraph([Layer(name="only", index=0, kind="conv2d", weight=np.full((2, 1, 3, 3), -1.0))])

    def compute(graph, context):
        seen["statistic"] = dict(context.options)
        return StatisticResult()

    class Recorder:
        @hpa.hookimpl
        def register_loaders(self, register):
            register(Loader(prefix="rec", load=load, options=(
                Option("rec_depth", int, 3, "a depth"), Option("rec_mode", str, "a", "a mode", ("a", "b")))))

        @hpa.hookimpl
        def register_statistics(self, register):
            register(Statistic(name="rec_stat", compute=compute, options=(
                Option("rec_scale", float, 1.0, "a scale"), Option("rec_flag", bool, False, "a flag"))))

    return Recorder()


def test_each_option_reaches_only_its_owner_converted(temporary_plugin):
    seen: dict = {}
    temporary_plugin(_recording_plugin(seen), "recorder")
    result = hpa.scan("rec:x", statistics=["rec_stat"], rec_depth="7", rec_flag="yes", rec_scale=2)
    assert seen["loader"] == {"rec_depth": 7, "rec_mode": "a"}
    assert {k: seen["statistic"][k] for k in ("rec_scale", "rec_flag")} == {"rec_scale": 2.0, "rec_flag": True}
    assert "rec_depth" not in seen["statistic"] and "rec_scale" not in seen["loader"]
    assert result.options["rec_flag"] is True
    with pytest.raises(hpa.OptionError, match="rec_mode must be one of a, b, not 'c'"):
        hpa.scan("rec:x", statistics=["rec_stat"], rec_mode="c")


def test_options_are_checked_before_the_model_is_loaded(temporary_plugin):
    seen: dict = {}
    temporary_plugin(_recording_plugin(seen), "recorder")
    with pytest.raises(hpa.OptionError, match="rec_scale"):
        hpa.scan("rec:x", statistics=["rec_stat"], rec_scale="big")
    assert "loader" not in seen


def test_statistic_option_for_a_statistic_that_does_not_apply_warns(temporary_plugin, recwarn):
    seen: dict = {}
    temporary_plugin(_recording_plugin(seen), "recorder")
    # a single conv has no stacked pair, so a default scan leaves cones out
    result = hpa.scan("rec:x", cones_rotation=False)
    assert "cones" in result.not_run
    assert any("cones_rotation has no effect" in str(w.message) for w in recwarn.list)


def test_plugins_may_not_declare_clashing_or_reserved_options(temporary_plugin):
    class Clash:
        @hpa.hookimpl
        def register_statistics(self, register):
            register(Statistic(name="other", compute=lambda g, c: StatisticResult(),
                               options=(Option("cones_device", str),)))

    temporary_plugin(Clash(), "clash")
    with pytest.raises(hpa.PluginError, match="statistic cones and the statistic other both declare"):
        hpa.plugins.registries()
    hpa.plugins.unregister("clash")

    class Reserved:
        @hpa.hookimpl
        def register_loaders(self, register):
            register(Loader(prefix="reserved", load=lambda n, o: None, options=(Option("seed", int),)))

    temporary_plugin(Reserved(), "reserved")
    with pytest.raises(hpa.PluginError, match="'seed', which is reserved"):
        hpa.plugins.registries()


def test_every_builtin_option_is_declared_completely():
    for owner in hpa.list_loaders() + hpa.list_statistics():
        for option in owner.options:
            assert option.help and "\n" not in option.help, option
            if option.default is not None:
                assert option.convert(option.default) == option.default, option


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
