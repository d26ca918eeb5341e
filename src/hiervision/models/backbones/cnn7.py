"""CNN-7: the plain CIFAR baseline of Liu, Guo & Lew (MMM 2017) that Guo et al. use in their CNN-RNN tables.

Guo et al. ("CNN-RNN: a large-scale hierarchical image classification framework") run their CIFAR-100
ablations (Table 2) and one row of Table 4 on "the CNN baseline proposed in [25]" (Liu, Guo & Lew,
"On the exploration of convolutional fusion networks for visual recognition"), drawn in their
Fig. 6. **The paper's Fig. 6 is not in the text we have; we assumed** the main branch of the CIFAR-100
network that the authors of [25] released with their code (Caffe, ``yuLiu24/CFN``,
``examples/cifar/CFN_cifar100_train_test.prototxt``). A convolutional fusion network is a plain CNN
plus side branches (1x1/3x3 conv + GAP on ``pool1`` and ``pool2``) and a weighted fusion of the pooled
branches; dropping those leaves the plain CNN:

=========  =================================================================
stage 1    conv1_1 3x3, 192 - ReLU - conv1_2 3x3, 192 - ReLU          (32x32)
stage 2    pool1 max 3x3/2 - dropout 0.5 - conv2_1, conv2_2 3x3, 192   (16x16)
stage 3    pool2 avg 3x3/2 - dropout 0.5 - conv3_1, conv3_2 3x3, 192
           - conv4 1x1, 192 - ReLU                                      (8x8)
head       global average pooling (- dropout 0.5 - fc, in the head)
=========  =================================================================

What we assumed beyond that file:

* "7" counts the seven conv layers (six 3x3 and the 1x1 ``conv4``); the classifier is an eighth weighted
  layer and, as everywhere in hiervision, lives in the head, not here;
* widths: the CIFAR-100 file uses 192 channels in every conv (its comment says so), the CIFAR-10 file
  96, 96 then 192 (:data:`CIFAR10_WIDTHS`); ``widths`` takes the seven counts, CIFAR-100's by default;
* no batch norm, conv biases and dropout 0.5 after ``pool1`` and ``pool2``, as in the file (Guo et al.
  "employ exactly the same experimental configuration as used in [25]"); ``batch_norm=True`` adds BN
  after every conv (and drops the then redundant conv biases) for recipes that train without the
  original schedule, ``dropout=0`` removes the two dropout layers;
* Caffe rounds pooled sizes up, so both 3x3 stride-2 pools use ``ceil_mode=True`` (32 -> 16 -> 8,
  28 -> 14 -> 7); the average pool divides by the number of in-image pixels, as Caffe does;
* initialisation: Kaiming-normal over fan-out with zero biases, as the other hiervision backbones; at
  192 channels that is N(0, 0.034) against the file's N(0, 0.05), and it stays sensible at small widths.

``forward_features`` returns the three stage outputs (after their last ReLU) at reductions 1, 2, 4;
with the default widths the network has 1,702,272 parameters for RGB input (1,721,572 with a 100-way fc).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from torch import nn

from hiervision.models.backbones.base import Backbone
from hiervision.models.backbones.registry import register_backbone

__all__ = ["CIFAR10_WIDTHS", "CIFAR100_WIDTHS", "CNN7"]

#: conv widths (conv1_1, conv1_2, conv2_1, conv2_2, conv3_1, conv3_2, conv4) of the CIFAR-100 network
CIFAR100_WIDTHS: tuple[int, ...] = (192,) * 7
#: the same for the released CIFAR-10 network
CIFAR10_WIDTHS: tuple[int, ...] = (96, 96, 192, 192, 192, 192, 192)

# (name, kernel) of the seven convs, grouped by stage; the names follow the Caffe file
_STAGES: tuple[tuple[tuple[str, int], ...], ...] = (
    (("1_1", 3), ("1_2", 3)),
    (("2_1", 3), ("2_2", 3)),
    (("3_1", 3), ("3_2", 3), ("4", 1)),
)


class CNN7(Backbone):
    """The plain 7-conv CIFAR network of Liu, Guo & Lew, following the backbone contract (see the module doc).

    Args:
        in_chans: input channels (1 or 3).
        widths: output channels of the seven convs, in order (default: 192 each, the CIFAR-100 network).
        batch_norm: BN after every conv (not in the original).
        dropout: probability of the dropout after each of the two pools (0.5 in the original).
    """

    def __init__(
        self,
        in_chans: int = 3,
        widths: Sequence[int] = CIFAR100_WIDTHS,
        batch_norm: bool = False,
        dropout: float = 0.5,
    ) -> None:
        widths = tuple(widths)
        if len(widths) != 7 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be 7 positive ints (one per conv), got {widths!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        super().__init__(in_chans)
        self.widths = widths
        self.batch_norm = batch_norm
        self.dropout = dropout
        self.stem = nn.Identity()  # the first stage starts at the input
        self.stages = nn.ModuleList()
        it = iter(widths)
        prev = in_chans
        for i, convs in enumerate(_STAGES):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            if i > 0:
                # max then average pooling, as in the Caffe file; ceil_mode reproduces Caffe's output sizes
                pool = nn.MaxPool2d(3, 2, ceil_mode=True) if i == 1 else nn.AvgPool2d(3, 2, ceil_mode=True)
                layers[f"pool{i}"] = pool
                if dropout > 0:
                    layers[f"drop{i}"] = nn.Dropout(dropout)
            for name, k in convs:
                w = next(it)
                layers[f"conv{name}"] = nn.Conv2d(prev, w, k, padding=k // 2, bias=not batch_norm)
                if batch_norm:
                    layers[f"bn{name}"] = nn.BatchNorm2d(w)
                layers[f"relu{name}"] = nn.ReLU(inplace=True)
                prev = w
            self.stages.append(nn.Sequential(layers))
            self.add_feature(prev, 2**i, f"stages.{i}")
        # Kaiming-normal over fan-out, not the original's N(0, 0.05) (see the module doc)
        self.init_weights()


@register_backbone("cnn7")
def _cnn7(in_chans: int = 3, **kwargs: Any) -> CNN7:
    return CNN7(in_chans=in_chans, **kwargs)
