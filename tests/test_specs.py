"""hpa/specs.py: a spec split at its loader's prefix, or a path recognised by its suffix."""

from __future__ import annotations

import pytest

from hpa.errors import SpecError
from hpa.registry import Loader, Registry
from hpa.specs import parse_spec


def test_parse_spec_prefixes_and_suffixes(tmp_path):
    registry = Registry[Loader]("loader", "prefix")
    registry.register(Loader(prefix="onnx", load=lambda n, o: None, suffixes=(".onnx",)), "onnx")
    registry.register(Loader(prefix="zoo", load=lambda n, o: None), "zoo")
    assert (parse_spec("zoo:digits", registry).prefix, parse_spec("zoo:digits", registry).name) == ("zoo", "digits")
    assert parse_spec("Model.ONNX", registry).prefix == "onnx"
    with pytest.raises(SpecError, match="unknown loader prefix 'zo'.*did you mean 'zoo'"):
        parse_spec("zo:digits", registry)
