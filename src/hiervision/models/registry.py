"""Model registry, timm-style: ``create_model(name, taxonomy=..., **kwargs)``."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    """Decorator registering a factory ``fn(taxonomy, **kwargs) -> HierarchicalClassifier``."""

    def wrap(fn: Callable) -> Callable:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """The names :func:`create_model` accepts (``model.name`` in a config), sorted."""
    return sorted(_MODELS)


def create_model(name: str, taxonomy, **kwargs) -> nn.Module:
    """Build a registered model; unknown names or arguments give a one-line ``ValueError``."""
    if name not in _MODELS:
        raise ValueError(f"model.name: unknown model {name!r} (known: {', '.join(list_models())})")
    fn = _MODELS[name]
    target = getattr(fn, "__wrapped__", fn)
    params = inspect.signature(target).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(f"model.{unknown[0]}: not an argument of model {name!r}")
    try:
        return fn(taxonomy, **kwargs)
    except TypeError as e:  # heads pass what they do not take on to the base class, which names it
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if unknown:
            raise ValueError(f"model.{unknown.group(1)}: not an argument of model {name!r}") from None
        raise ValueError(f"model {name!r}: {e}") from None
