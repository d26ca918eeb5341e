"""Feature extractors behind one timm-style contract, so heads never care which network they sit on.

Every backbone is a :class:`~hiervision.models.backbones.base.Backbone` (an :class:`torch.nn.Module`) with

* ``forward_features(x) -> list[Tensor]``: one feature map per stage (see each family for which);
* ``feature_info``: ``[{"num_chs", "reduction", "module"}, ...]``, one dict per returned map;
* ``num_features``: channels of the last map;
* ``forward(x)``: global-average-pooled last map, shape ``(B, num_features)``;
* an ``in_chans`` constructor argument (1 for grey-scale data such as MNIST, 3 for RGB).

The base class implements the parts every family shares (``forward``, ``num_features``, the stage loop
of ``forward_features`` and the weight init), so a family file holds only its layout.

Build them by name with :func:`create_backbone`; ``"timm/<model>"`` wraps a timm model when the
optional ``timm`` extra is installed, and ``"hf:<hub id or folder>"`` a Hugging Face encoder (DINOv2, ViT,
ConvNeXt, ...) with the ``hf`` extra, whose ``hf_input_settings``/``encoder_data_settings`` give the data
settings it expects. Weights come from a local file (``pretrained_path``) or an ``hf:`` folder; only an
``hf:`` hub id downloads (once, into the Hugging Face cache).
"""

from hiervision.models.backbones.registry import (
    HF_PREFIX,
    TIMM_PREFIX,
    create_backbone,
    list_backbones,
    load_backbone_weights,
    register_backbone,
)

__all__ = ["HF_PREFIX", "TIMM_PREFIX", "create_backbone", "list_backbones", "load_backbone_weights",
           "register_backbone"]

# built-in families register themselves on import
from hiervision.models.backbones import cifar_resnet as cifar_resnet
from hiervision.models.backbones import cnn7 as cnn7
from hiervision.models.backbones import resnet as resnet
from hiervision.models.backbones import vgg as vgg
from hiervision.models.backbones import wide_resnet as wide_resnet
from hiervision.models.backbones.base import Backbone
from hiervision.models.backbones.cifar_resnet import CifarResNet
from hiervision.models.backbones.cnn7 import CNN7
from hiervision.models.backbones.hf import HFBackbone, encoder_data_settings, hf_input_settings
from hiervision.models.backbones.resnet import ResNet
from hiervision.models.backbones.timm_adapter import TimmBackbone
from hiervision.models.backbones.vgg import VGG
from hiervision.models.backbones.wide_resnet import WideResNet, WiderResNet

__all__ += ["Backbone", "CNN7", "CifarResNet", "HFBackbone", "ResNet", "TimmBackbone", "VGG", "WideResNet",
            "WiderResNet", "encoder_data_settings", "hf_input_settings"]
