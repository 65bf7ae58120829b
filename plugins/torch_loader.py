"""``torch:PATH`` and plain ``.pt .pth .bin .ckpt .safetensors`` paths, and torch files by content.

The file may hold a bare state_dict (no model code needed), a checkpoint
dict wrapping one (``state_dict``, ``model``, ``net``, ...; ``-o checkpoint_key``
picks among several), a pickled ``nn.Module`` (only with ``--trust-pickle``),
or a TorchScript archive, which is recognised by its content whatever its
suffix (``.jit``, ``.ptl``, ``.torchscript``, none).
"""

from __future__ import annotations

from hpa import LoadOptions, Loader, Option, OptionError, hookimpl
from hpa.sniff import is_torch_file

PREFIX = "torch"
OPTIONS = (
    Option("checkpoint_key", str, None, "checkpoint entry holding the weights to scan (e.g. model_ema); "
                                         "default: state_dict, model, ... before EMA copies"),
    Option("bn_eps", float, 1e-5, "BatchNorm eps for bare state_dicts, which do not store it (cosines "
                                  "and n_l do not depend on it)"),
)


def sniff(path) -> bool:
    """TorchScript or torch.save zip, legacy torch pickle, or safetensors"""
    return is_torch_file(path)


@hookimpl
def register_loaders(register):
    register(Loader(prefix=PREFIX, load=load, suffixes=(".pt", ".pth", ".bin", ".ckpt", ".safetensors"),
                    description="PyTorch files: state_dict, checkpoint, pickled nn.Module, TorchScript",
                    options=OPTIONS, sniff=sniff))


def load(path: str, options: LoadOptions):
    from hpa.backends.state_dict import graph_from_state_dict
    from hpa.backends.torch_files import read_checkpoint
    from hpa.backends.torch_trace import to_numpy, trace_module
    checkpoint = read_checkpoint(path, options.trust_pickle, _option(options, "checkpoint_key"))
    source = {"file": str(path), "content": checkpoint.kind}
    if checkpoint.key:
        source["checkpoint_key"] = checkpoint.key
        source["checkpoint_keys"] = list(checkpoint.keys)
    if checkpoint.skipped_entries:  # read without the packages their pickled objects need
        source["entries_not_loaded"] = {k: list(v) for k, v in checkpoint.skipped_entries.items()}
    if checkpoint.kind == "state_dict":
        return graph_from_state_dict(checkpoint.state_dict, _array(to_numpy), options.fold_bn, source,
                                     bn_eps=_option(options, "bn_eps"), module_classes=checkpoint.module_classes)
    if checkpoint.kind == "torchscript":
        from hpa.backends.torchscript_graph import graph_from_torchscript

        return graph_from_torchscript(checkpoint.module, options.fold_bn, source)
    if options.input_size is None:
        raise OptionError(f"{path} holds a whole nn.Module; pass --input-size C,H,W so hpa can trace it")
    return trace_module(checkpoint.module, options.input_size, fold_bn=options.fold_bn, source=source,
                        seed=options.seed, copy_weights=False)  # the unpickled module is dropped after


def _option(options: LoadOptions, name: str):
    """The option's value: converted by the core's option routing when it has run, else the raw
    ``-o`` string (or Python keyword), converted here the same way."""
    declared = next(o for o in OPTIONS if o.name == name)
    value = options.extra.get(name, declared.default)
    if value is None or value == declared.default:
        return value

    try:
        return declared.type(value)
    except (TypeError, ValueError):
        raise OptionError(f"-o {name}={value!r} must be a {declared.type.__name__}") from None


def _array(to_numpy):
    import numpy as np

    def convert(value):
        return value if isinstance(value, np.ndarray) else to_numpy(value)

    return convert
