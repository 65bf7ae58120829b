"""``torch:PATH`` and plain ``.pt .pth .bin .ckpt .safetensors`` paths.

The file may hold a bare state_dict (no model code needed), a checkpoint
dict wrapping one (``state_dict``, ``model``, ``net``, ...), a pickled
``nn.Module`` (only with ``--trust-pickle``), or a TorchScript archive.
"""

from __future__ import annotations

from hpa.hookspecs import hookimpl
from hpa.registry import Loader, LoadOptions

PREFIX = "torch"


@hookimpl
def register_loaders(register):
    register(Loader(prefix=PREFIX, load=load, suffixes=(".pt", ".pth", ".bin", ".ckpt", ".safetensors"),
                    description="PyTorch files: state_dict, checkpoint, pickled nn.Module, TorchScript"))


def load(path: str, options: LoadOptions):
    from hpa.backends.state_dict import graph_from_state_dict
    from hpa.backends.torch_files import read_checkpoint
    from hpa.backends.torch_trace import to_numpy, trace_module
    from hpa.errors import OptionError

    checkpoint = read_checkpoint(path, options.trust_pickle)
    source = {"file": str(path), "content": checkpoint.kind, "fold_bn": options.fold_bn}
    if checkpoint.key:
        source["checkpoint_key"] = checkpoint.key
    if checkpoint.kind == "state_dict":
        return graph_from_state_dict(checkpoint.state_dict, _array(to_numpy), options.fold_bn, source)
    if checkpoint.kind == "torchscript":
        from hpa.backends.torchscript_graph import graph_from_torchscript

        return graph_from_torchscript(checkpoint.module, options.fold_bn, source)
    if options.input_size is None:
        raise OptionError(f"{path} holds a whole nn.Module; pass --input-size C,H,W so hpa can trace it")
    source["input_size"] = list(options.input_size)
    return trace_module(checkpoint.module, options.input_size, fold_bn=options.fold_bn, source=source,
                        seed=options.seed)


def _array(to_numpy):
    import numpy as np

    def convert(value):
        return value if isinstance(value, np.ndarray) else to_numpy(value)

    return convert
