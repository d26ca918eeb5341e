"""Serving a trained model over HTTP (``pip install 'hiervision[serve]'``): ``hiervision serve RUN_OR_ONNX``."""

from hiervision.serve.app import Limits, create_app, serve
from hiervision.serve.predictor import ImagePredictor, load_predictor

__all__ = ["ImagePredictor", "Limits", "create_app", "load_predictor", "serve"]
