"""The ``matconvnet:PATH`` loader (a plain ``*.mat`` path works too): MatConvNet SimpleNN and DagNN files.

The parsing lives in :mod:`hpa.backends.matconvnet`; this plugin only registers it.
"""

from __future__ import annotations

from hpa import LoadOptions, Loader, hookimpl
from hpa import sniff


@hookimpl
def register_loaders(register):
    register(Loader(
        prefix="matconvnet",
        load=load,
        suffixes=(".mat",),
        sniff=sniff.is_matlab,  # files with no or an unknown suffix, by content
        description="MatConvNet model files (SimpleNN or DagNN .mat, read with scipy.io.loadmat)",
    ))


def load(name: str, options: LoadOptions):
    from hpa.backends.matconvnet import load_matconvnet

    return load_matconvnet(name, options)
