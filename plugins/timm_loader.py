"""``timm:NAME[.TAG]``: any timm model.

Pretrained weights come from the Hugging Face cache (``HF_HUB_OFFLINE=1`` is
honoured).  ``--weights PATH`` loads a local file through timm's
pretrained-config ``file`` overlay, so timm's own checkpoint filters run and a
torchvision-format file loads into the timm model; timm reads it with
``weights_only=True``.  ``--weights none`` gives a seeded random init.
"""

from __future__ import annotations

import os

from hpa.errors import LoadError, SpecError
from hpa.hookspecs import hookimpl
from hpa.registry import Loader, LoadOptions, suggest

PREFIX = "timm"


@hookimpl
def register_loaders(register):
    register(Loader(prefix=PREFIX, load=load, list_models=list_models, builds_init=True,
                    description="timm models, NAME or NAME.TAG (Hugging Face cache, a file, or none)"))


def list_models() -> list[str]:
    import timm

    return sorted(set(timm.list_models()) | set(timm.list_models(pretrained=True)))


def load(name: str, options: LoadOptions):
    import timm

    from hpa.backends.torch_files import read_state_dict
    from hpa.backends.torch_trace import trace_module

    architecture = name.split(".")[0]
    if not timm.is_model(architecture):
        raise SpecError(f"unknown timm model {name!r}{suggest(architecture, timm.list_models(), PREFIX + ':')} "
                        f"(list them with: hpa list-models timm 'PATTERN')")
    weights = options.weights
    kwargs = dict(options.extra)
    source = {"weights": weights or "pretrained"}
    if weights is not None and weights.lower() == "none":
        from hpa.backends.torch_models import seeded

        model = seeded(lambda: _create(timm, name, pretrained=False, **kwargs), options.seed)
        source.update(weights="none", seed=options.seed)
    elif weights is not None:
        if not os.path.exists(weights):
            raise LoadError(f"weights file {weights} does not exist; check the path")
        read_state_dict(weights, options.trust_pickle)  # validates the file safely, with clear errors
        model = _create(timm, name, pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(weights)},
                        **kwargs)
    else:
        model = _create(timm, name, pretrained=True, **kwargs)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    input_size = options.input_size or tuple(cfg.get("input_size") or (3, 224, 224))
    source.update(input_size=list(input_size), fold_bn=options.fold_bn, pretrained_tag=cfg.get("tag"))
    return trace_module(model, input_size, fold_bn=options.fold_bn, source=source, seed=options.seed)


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
