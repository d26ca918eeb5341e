"""Model registry, timm-style: ``create_model(name, taxonomy=..., **kwargs)``.

A head registers itself with what it can do (``@register_model("name", multi_label=False, ...)``), so the
recipe (``train FOLDER --method``), the demo and the contract tests read its capabilities from here and a new
head is one file. Heads in this package are found by walking it; heads outside it are named by the
``HIERVISION_MODELS`` environment variable (module names or ``.py`` files, separated by ``os.pathsep``) or by
an installed package's ``hiervision.models`` entry point.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["PLUGINS_ENV", "ModelInfo", "check_model_keys", "create_model", "list_models", "load_plugins",
           "model_arguments", "model_info", "register_model"]

#: the environment variable naming heads outside the package (module names or .py files, os.pathsep-separated)
PLUGINS_ENV = "HIERVISION_MODELS"
#: the entry-point group an installed package registers its heads under (the module is imported)
ENTRY_POINT_GROUP = "hiervision.models"


@dataclass(frozen=True)
class ModelInfo:
    """What a registered head is and can do; everything outside the head file reads this.

    Attributes:
        name: ``model.name`` in a config.
        factory: ``fn(taxonomy, **kwargs) -> HierarchicalClassifier``.
        multi_label: trains on multi-label data (several paths per image).
        fixed_depth: needs every leaf at the same depth (one step or head per level).
        given: can condition its prediction on a given node (``decode_given``).
        method: the config sections ``train FOLDER --method NAME`` merges into the recipe (the options the head
            had in the comparison); ``model.name`` is added.
        tiny: keyword arguments that keep the head tiny (contract tests, smoke runs).
    """

    name: str
    factory: Callable[..., nn.Module]
    multi_label: bool = True
    fixed_depth: bool = False
    given: bool = True
    method: dict[str, Any] = field(default_factory=dict)
    tiny: dict[str, Any] = field(default_factory=dict)

    def recipe_options(self) -> dict[str, Any]:
        """The config sections of ``--method NAME``: the head's ``method`` with its ``model.name``."""
        return {**self.method, "model": {"name": self.name, **self.method.get("model", {})}}


_MODELS: dict[str, ModelInfo] = {}


def register_model(name: str, *, multi_label: bool = True, fixed_depth: bool = False, given: bool = True,
                   method: dict[str, Any] | None = None, tiny: dict[str, Any] | None = None) -> Callable:
    """Decorator registering a factory ``fn(taxonomy, **kwargs) -> HierarchicalClassifier`` with its
    capabilities (:class:`ModelInfo`)."""

    def wrap(fn: Callable) -> Callable:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = ModelInfo(name, fn, multi_label, fixed_depth, given, dict(method or {}), dict(tiny or {}))
        return fn

    return wrap


def list_models() -> list[str]:
    """The names :func:`create_model` accepts (``model.name`` in a config), sorted."""
    return sorted(_MODELS)


def model_info(name: str) -> ModelInfo:
    """The registered head ``name``'s :class:`ModelInfo`; an unknown name is a one-line ``ValueError``."""
    if name not in _MODELS:
        raise ValueError(f"model.name: unknown model {name!r} (known: {', '.join(list_models())})")
    return _MODELS[name]


def model_arguments(name: str) -> frozenset[str] | None:
    """The keyword arguments head ``name`` takes (its factory's, then each constructor's up the class chain while
    they pass ``**kwargs`` on), read from signatures without building anything; ``None`` when a signature
    leaves them open. Lets a config's ``model.*`` keys be checked before any data is read."""
    target = getattr(model_info(name).factory, "__wrapped__", model_info(name).factory)
    names: set[str] = set()
    chain: list[Callable] = [target]
    try:
        cls = typing.get_type_hints(target).get("return")
    except (NameError, TypeError):
        cls = None
    chain += [k.__init__ for k in getattr(cls, "__mro__", ()) if "__init__" in k.__dict__]
    for fn in chain:
        params = inspect.signature(fn).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return frozenset(names - {"self", "taxonomy"})
    return None


def check_model_keys(model_cfg: dict) -> None:
    """One line naming the first ``model.*`` key that head ``model.name`` does not take (before any data)."""
    accepted = model_arguments(model_cfg["name"])
    if accepted is None:
        return
    given = set(model_cfg) - {"name", "in_chans", "multi_label", "image_size"}
    unknown = sorted(given - accepted)
    if unknown:
        raise ValueError(f"model.{unknown[0]}: not an argument of model {model_cfg['name']!r}")


def create_model(name: str, taxonomy, **kwargs) -> nn.Module:
    """Build a registered model; unknown names or arguments give a one-line ``ValueError``."""
    fn = model_info(name).factory
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


def _import_file(path: Path) -> None:
    """Import a head kept in a ``.py`` file outside any package, once, under its file name."""
    if not path.is_file():
        raise FileNotFoundError(f"{PLUGINS_ENV}: {path}: no such head file")
    name = path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path.resolve()):
        return
    spec = importlib.util.spec_from_file_location(name, path.resolve())
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


def load_plugins(entries: str | None = None) -> None:
    """Import the heads outside the package: the installed ``hiervision.models`` entry points and what
    ``HIERVISION_MODELS`` (or ``entries``) names. The user chose to run these files, as with ``PYTHONPATH``."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        importlib.import_module(ep.value.partition(":")[0])
    spec = os.environ.get(PLUGINS_ENV, "") if entries is None else entries
    for entry in filter(None, (e.strip() for e in spec.split(os.pathsep))):
        if entry.endswith(".py") or os.sep in entry:
            _import_file(Path(entry))
        else:
            try:
                importlib.import_module(entry)
            except ModuleNotFoundError as e:
                raise ValueError(f"{PLUGINS_ENV}: {entry}: no such module ({e})") from None
