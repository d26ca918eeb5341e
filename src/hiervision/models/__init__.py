"""Models: every one a plain ``nn.Module`` made by ``create_model(name, taxonomy, **kwargs)``."""

from hiervision.models import bilt, dhnn, flat, guo, haf, haframe, hie, hiernet, margin  # noqa: F401  (register)
from hiervision.models.base import HierarchicalClassifier
from hiervision.models.registry import create_model, list_models, register_model

__all__ = ["HierarchicalClassifier", "create_model", "list_models", "register_model"]
