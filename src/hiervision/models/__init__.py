"""Models: every one a plain ``nn.Module`` made by ``create_model(name, taxonomy, **kwargs)``.

Every module of this package is imported here, so a head file dropped beside the others registers itself
with no import line to add; heads outside the package come from :func:`~hiervision.models.registry.load_plugins`.
"""

import importlib
import pkgutil

from hiervision.models.base import HierarchicalClassifier
from hiervision.models.registry import (
    ModelInfo,
    create_model,
    list_models,
    load_plugins,
    model_info,
    register_model,
)

__all__ = ["HierarchicalClassifier", "ModelInfo", "create_model", "list_models", "load_plugins", "model_info",
           "register_model"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
load_plugins()
