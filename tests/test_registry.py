"""hpa/registry.py on its own: the registry, suggestions and listing."""

from __future__ import annotations

import pytest

from hpa.errors import PluginError, SpecError, suggest
from hpa.registry import Loader, Registry, match


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
