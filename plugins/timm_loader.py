"""``timm:NAME[.TAG]``: any timm model.

Pretrained weights come from the Hugging Face cache (``HF_HUB_OFFLINE=1`` is
honoured).  ``--weights PATH`` loads a local file through timm's
pretrained-config ``file`` overlay, so timm's own checkpoint filters run and a
torchvision-format file loads into the timm model; timm reads it with
``weights_only=True``.  ``--weights none`` (``weights=None`` in Python) gives a seeded random init.
Keywords for ``timm.create_model``: the options below (``-o num_classes=10``).
"""

from __future__ import annotations

import os

from hpa import LoadError, LoadOptions, Loader, Option, SpecError, hookimpl, suggest

PREFIX = "timm"
# Keywords for timm.create_model (None: timm's default).
OPTIONS = (
    Option("num_classes", int, None, "classes of the classifier (default: the pretrained config's)"),
    Option("in_chans", int, None, "input channels; timm adapts the first conv of pretrained weights"),
)


@hookimpl
def register_loaders(register):
    register(Loader(prefix=PREFIX, load=load, build=build, list_models=list_models, builds_init=True,
                    gallery_models=gallery_models, download_command=download_command,
                    options=OPTIONS, description="timm models, NAME or NAME.TAG (Hugging Face cache, a file, or none)"))


def list_models() -> list[str]:
    import timm

    return sorted(set(timm.list_models()) | set(timm.list_models(pretrained=True)))


def gallery_models(pretrained: bool) -> list[str]:
    """One name per distinct model: each pretrained weight set (NAME.TAG), or each architecture when the
    gallery scans seeded initialisations (the tags of one architecture would give the same model)."""
    import timm

    return sorted(timm.list_models(pretrained=pretrained))


def download_command(name: str, options: LoadOptions) -> str | None:
    """The command that fills the cache with timm:NAME's pretrained weights; None when nothing is needed."""
    import timm

    if not options.default_weights or options.random_init:
        return None
    _check_name(timm, name)
    cached, where, _ = _cached_weights(timm, name)
    if cached is not None:
        return None
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.hf_hub_id:
        return f"hf download {cfg.hf_hub_id.partition('@')[0]}"
    import torch

    return f"wget -P {os.path.join(torch.hub.get_dir(), 'checkpoints')} {where}"


def build(name: str, options: LoadOptions):
    """The untrained module, seeded by ``options.seed``; ``in_chans`` defaults to ``options.input_size``'s channels."""
    import timm

    from hpa.backends.torch_models import seeded

    _check_name(timm, name)
    kwargs = {key: value for key, value in options.extra.items() if value is not None}
    if options.input_size and "in_chans" not in kwargs:
        kwargs["in_chans"] = int(options.input_size[0])
    return seeded(lambda: _create(timm, name, pretrained=False, **kwargs), options.seed)


def _check_name(timm, name: str) -> None:
    architecture = name.split(".")[0]
    if not timm.is_model(architecture):
        raise SpecError(f"unknown timm model {name!r}{suggest(architecture, timm.list_models(), PREFIX + ':')} "
                        f"(list them with: hpa list-models timm 'PATTERN')")


def load(name: str, options: LoadOptions):
    import timm

    from hpa.backends.torch_files import read_state_dict
    from hpa.backends.torch_trace import trace_module

    _check_name(timm, name)
    weights = options.weights
    kwargs = {key: value for key, value in options.extra.items() if value is not None}
    source = {"weights": "pretrained" if options.default_weights else weights}
    if options.random_init:
        model = build(name, options)  # load = trace(build(...))
        source.update(weights="none", seed=options.seed)
    elif not options.default_weights:
        if not os.path.exists(weights):
            raise LoadError(f"weights file {weights} does not exist; check the path")
        read_state_dict(weights, options.trust_pickle)  # validates the file safely, with clear errors
        model = _create(timm, name, pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(weights)},
                        **kwargs)
    else:
        model = _create_pretrained(timm, name, kwargs)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    input_size = options.input_size or tuple(cfg.get("input_size") or (3, 224, 224))
    source.update(pretrained_tag=cfg.get("tag"))
    return trace_module(model, input_size, fold_bn=options.fold_bn, source=source, seed=options.seed,
                        copy_weights=False)  # the module is ours and dropped: no copy needed


def _create_pretrained(timm, name: str, kwargs: dict):
    """The model with its pretrained weights: from the cache without touching the network, else downloaded.

    Offline, huggingface_hub retries for about a minute before it gives up, so the
    cache is looked at first and the Hub is probed with a short timeout before a download.
    """
    cached, where, hint = _cached_weights(timm, name)
    if cached is not None:  # timm's file route runs the same checkpoint filters as its Hub route
        return _create(timm, name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)
    reason = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") \
        else unreachable(where)
    if reason:
        raise LoadError(f"no cached pretrained weights for timm:{name} in {hint} and they cannot be downloaded "
                        f"({reason}); or pass --weights PATH, or --weights none for a random init")
    return _create(timm, name, pretrained=True, **kwargs)


def _cached_weights(timm, name: str) -> tuple[str | None, str, str]:
    """(the cached weights file or None, the URL a download needs, where the cache is and how to fill it)."""
    cfg = timm.models.get_pretrained_cfg(name)
    repo = cfg.hf_hub_id if cfg is not None else None
    if repo:
        from huggingface_hub import constants, try_to_load_from_cache

        repo_id, _, revision = repo.partition("@")
        for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]):
            path = try_to_load_from_cache(repo_id, filename, revision=revision or None)
            if isinstance(path, str):
                return path, constants.ENDPOINT, ""
        return None, constants.ENDPOINT, (f"the Hugging Face cache {constants.HF_HUB_CACHE} (fill it on a "
                                          f"connected machine with 'hf download {repo_id}' and copy it here, "
                                          "or point HF_HOME at a filled one)")
    url = cfg.url if cfg is not None else None
    if not url:
        raise LoadError(f"timm:{name} has no pretrained weights; pass --weights PATH or --weights none")
    import torch

    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, os.path.basename(url))
    return (path if os.path.exists(path) else None), url, f"{folder} (copy {url} there on a connected machine)"


def unreachable(url: str, timeout: float = 3.0) -> str | None:
    """Why ``url`` cannot be reached within ``timeout`` seconds (proxy settings honoured), or None.

    Any HTTP answer, even an error status, means the network works.
    """
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as exc:  # URLError, timeouts and refused connections are OSErrors
        reason = getattr(exc, "reason", None) or exc
        return f"no connection to {url}: {reason}"
    return None


def _create(timm, name: str, **kwargs):
    try:
        return timm.create_model(name, **kwargs)
    except (RuntimeError, ValueError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "Unknown" in text or "Invalid pretrained tag" in text:
            raise SpecError(f"timm cannot build {name!r} ({text}); see hpa list-models timm '{name.split('.')[0]}*'"
                            ) from None
        if kwargs.get("pretrained_cfg_overlay"):
            raise LoadError(f"timm could not load the weights file into {name} ({text}); "
                            "check that it belongs to this architecture") from None
        if not kwargs.get("pretrained"):  # nothing was downloaded: building failed (e.g. out of memory)
            raise
        raise _offline_error(name, exc) from None
    except OSError as exc:
        raise _offline_error(name, exc) from None
    except Exception as exc:  # huggingface_hub raises its own types when offline
        if "huggingface" in type(exc).__module__ or "connect" in str(exc).lower() or "offline" in str(exc).lower():
            raise _offline_error(name, exc) from None
        raise


def _offline_error(name: str, exc: BaseException) -> LoadError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = text.split(". ")[0].rstrip(".")  # the first sentence says enough
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return LoadError(f"no cached pretrained weights for timm:{name} and they cannot be downloaded{offline}: "
                     f"{text}; fill the Hugging Face cache on a connected machine, or pass --weights PATH, "
                     "or --weights none for a random init")
