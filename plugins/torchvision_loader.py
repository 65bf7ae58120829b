"""``torchvision:NAME``: any ``torchvision.models`` classification model.

``--weights``: omitted or ``DEFAULT`` -> the model's DEFAULT weights (from the
torch hub cache, downloaded if missing); ``none`` -> seeded random init; an
enum name such as ``IMAGENET1K_V1`` (or ``VGG19_Weights.IMAGENET1K_V1``); or a
path to a local file.  Builder keywords: the options below (``-o num_classes=10``);
torchvision builders take different keywords, so hpa declares the ones that most take
and the builder itself refuses one that its model does not.
"""

from __future__ import annotations

import os

from hpa import LoadError, LoadOptions, Loader, Option, OptionError, SpecError, hookimpl, suggest

PREFIX = "torchvision"
# Input sizes that differ from 3x224x224.
_INPUT_SIZES = {"inception_v3": (3, 299, 299)}
# Builder keywords (None: the builder's default).
OPTIONS = (
    Option("num_classes", int, None, "classes of the last layer (default: those of the weights, else 1000)"),
    Option("dropout", float, None, "dropout probability, for builders that take one (vgg, mobilenet, ...)"),
)


@hookimpl
def register_loaders(register):
    register(Loader(prefix=PREFIX, load=load, build=build, list_models=list_models, builds_init=True,
                    download_command=download_command,
                    options=OPTIONS, description="torchvision.models classification models (DEFAULT weights, an enum, a file, or none)"))


def list_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def download_command(name: str, options: LoadOptions) -> str | None:
    """The command that puts the weights ``load`` wants into the torch hub cache; None when they are there
    (or no download is needed: a random init, a file)."""
    import torch

    from hpa.backends.torch_models import looks_like_path  # here, not at the top: it imports torch

    weights = options.weights
    _builder(name)
    if options.random_init or (not options.default_weights and (os.path.exists(weights) or looks_like_path(weights))):
        return None
    enum = _resolve_enum(name, weights)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    if os.path.exists(os.path.join(folder, os.path.basename(enum.url))):
        return None
    return f"wget -P {folder} {enum.url}"


def build(name: str, options: LoadOptions):
    """The untrained module, seeded by ``options.seed``: ``-o`` keywords, and the first conv taking
    ``options.input_size``'s channels (so a 1-channel task trains a torchvision architecture)."""
    from hpa.backends.torch_models import seeded

    builder_fn = _builder(name)
    kwargs = {key: value for key, value in options.extra.items() if value is not None}
    channels = options.input_size[0] if options.input_size else None
    return seeded(lambda: _with_input_channels(_build(builder_fn, name, kwargs), channels), options.seed)


def _builder(name: str):
    import torchvision

    names = list_models()
    if name not in names:
        raise SpecError(f"unknown torchvision model {name!r}{suggest(name, names, PREFIX + ':')} "
                        f"(list them with: hpa list-models torchvision)")
    return torchvision.models.get_model_builder(name)


def _with_input_channels(model, channels: int | None):
    """``model`` whose first conv reads ``channels`` planes (a fresh conv of the same shape otherwise)."""
    from torch import nn

    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if channels is None or first is None or first.in_channels == channels:
        return model
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if child is first:
                setattr(parent, child_name, nn.Conv2d(channels, first.out_channels, first.kernel_size, first.stride,
                                                      first.padding, first.dilation, first.groups,
                                                      first.bias is not None, first.padding_mode))
                return model
    return model


def load(name: str, options: LoadOptions):
    from hpa.backends.torch_models import build_for_weights, looks_like_path
    from hpa.backends.torch_trace import trace_module

    builder_fn = _builder(name)
    kwargs = {key: value for key, value in options.extra.items() if value is not None}
    weights = options.weights
    source = {"weights": weights or "DEFAULT"}
    if options.random_init:
        model = build(name, options)  # load = trace(build(...))
        source.update(weights="none", seed=options.seed)
    elif not options.default_weights and (os.path.exists(weights) or looks_like_path(weights)):
        from hpa.backends.torch_files import read_state_dict

        state = read_state_dict(weights, options.trust_pickle)
        if name in ("googlenet", "inception_v3"):
            kwargs.setdefault("aux_logits", any(k.startswith("aux") for k in state))
            kwargs.setdefault("init_weights", False)
        model = build_for_weights(lambda: _build(builder_fn, name, kwargs), state, f"{PREFIX}:{name}")
    else:
        enum = _resolve_enum(name, weights)
        state = _cached_state_dict(enum, name)
        kwargs.setdefault("num_classes", len(enum.meta.get("categories") or []) or 1000)
        if name in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=True, init_weights=False, transform_input=True)
        model = build_for_weights(lambda: _build(builder_fn, name, kwargs), state, f"{PREFIX}:{name}")
        source["weights"] = str(enum)
    input_size = options.input_size or _INPUT_SIZES.get(name, (3, 224, 224))
    return trace_module(model, input_size, fold_bn=options.fold_bn, source=source, seed=options.seed,
                        copy_weights=False)  # the module is ours and dropped: no copy needed


def _build(builder_fn, name: str, kwargs: dict):
    """The untrained model; a declared option this builder does not take is one line, not a traceback."""
    try:
        return builder_fn(weights=None, **kwargs)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise

        given = ", ".join(f"-o {key}" for key in kwargs)
        raise OptionError(f"torchvision:{name} does not take {given} ({exc}); drop the option") from None


def _resolve_enum(name: str, weights: str | None):
    import torchvision

    enum_class = torchvision.models.get_model_weights(name)
    if weights is None or weights.upper() == "DEFAULT":
        return enum_class.DEFAULT
    member = weights.split(".")[-1]
    try:
        return enum_class[member]
    except KeyError:
        choices = [m.name for m in enum_class]
        raise SpecError(f"torchvision:{name} has no weights {weights!r}{suggest(member, choices)}; "
                        f"or give a file path, or 'none' for a random init") from None


def _cached_state_dict(enum, name: str):
    """The weights from the torch hub cache, downloading them only if they are not there."""
    import torch

    from hpa.backends.torch_files import read_state_dict

    filename = os.path.basename(enum.url)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, filename)
    if not os.path.exists(path):
        # A short probe first: torch.hub waits without a time limit where the network drops packets.
        reason = _unreachable(enum.url)
        try:
            if reason is None:
                os.makedirs(folder, exist_ok=True)
                torch.hub.download_url_to_file(enum.url, path, progress=False)
        except Exception as exc:  # DNS failure, HTTP error, a connection lost midway
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if reason is not None:
            raise LoadError(f"no cached {enum} weights of torchvision:{name} ({filename}) in {folder}, and hpa "
                            f"cannot download them ({reason}); on a connected machine download {enum.url} and "
                            "copy it into that folder (TORCH_HOME moves it), or pass --weights PATH, "
                            "or --weights none for a random init")
    return read_state_dict(path)


def _unreachable(url: str, timeout: float = 3.0) -> str | None:
    """Why ``url`` cannot be reached within ``timeout`` seconds (proxy settings honoured), or None."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # an answer, even an error status, means the network works
    except (OSError, ValueError) as exc:  # refused connections, DNS failures and timeouts
        return f"no connection to {url.split('/')[2]}: {getattr(exc, 'reason', None) or exc}"
    return None
