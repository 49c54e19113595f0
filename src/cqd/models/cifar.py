"""Small CIFAR-style classifiers that train in minutes on a CPU at 28-32 px.

ResNets follow He et al. (2016, sec. 4.2): a 3x3 stem, three stages of basic blocks, depth 6n+2;
the x4 variants are the wide ones of the distillation literature (CRD, Tian et al. 2020) with
1x1-conv shortcuts. WRNs follow Zagoruyko and Komodakis (2016) with pre-activation blocks, and
vgg8 is CRD's small VGG with BatchNorm. All end in global average pooling, so any input of at
least 16 px works, and expose `forward_features` (the pooled vector) and `head` so distillation
methods can work on features, and `stage_layers`: the module paths of each stage's output after the stem,
the maps RepDistiller's and mdistiller's feature lists give (`feats[1:-1]`), which AT taps and FitNet picks
its hint from.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cqd.models.factory import MODELS


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class _Net(nn.Module):
    """A `features` trunk, global average pooling and a linear `head`."""

    features: nn.Sequential
    stage_layers: list[str]  # each stage's output after the stem (cqd.models.taps.stage_outputs)

    def _finish(self, num_classes: int, in_chans: int, width: int) -> None:
        """Add pooling and head after the trunk, then Kaiming-initialise (He et al. 2015)."""
        self.num_classes, self.in_chans = num_classes, in_chans
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs, post-activation; a 1x1 conv shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Wide ResNet block: BN-ReLU-conv twice; the shortcut conv sees the pre-activated input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + skip


class ResNet(_Net):
    """CIFAR ResNet: a `widths[0]`-channel stem, then a stage of `n` blocks per further width."""

    def __init__(self, n: int, widths: tuple[int, ...], num_classes: int, in_chans: int):
        super().__init__()
        stem, *stages = widths
        layers: list[nn.Module] = [
            _conv3x3(in_chans, stem), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)
        ]
        cin = stem
        for i, width in enumerate(stages):
            for j in range(n):
                layers.append(BasicBlock(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width
        self.features = nn.Sequential(*layers)
        self.stage_layers = [f"features.{2 + n * (i + 1)}" for i in range(len(stages))]  # each stage's last block
        self._finish(num_classes, in_chans, cin)


class WideResNet(_Net):
    """WRN-depth-k: depth = 6n+4, stages of 16k/32k/64k channels, final BN-ReLU before pooling."""

    def __init__(self, depth: int, k: int, num_classes: int, in_chans: int):
        super().__init__()
        n = (depth - 4) // 6
        layers: list[nn.Module] = [_conv3x3(in_chans, 16)]
        cin = 16
        for i, width in enumerate((16 * k, 32 * k, 64 * k)):
            for j in range(n):
                layers.append(PreActBlock(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width
        layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.stage_layers = [f"features.{n * (i + 1)}" for i in range(3)]  # each stage's last block, before BN-ReLU
        self._finish(num_classes, in_chans, cin)


class VGG(_Net):
    """VGG with BatchNorm: a 2x2 max-pool between stages (not after the last)."""

    def __init__(self, stages: tuple[tuple[int, ...], ...], num_classes: int, in_chans: int):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        self.stage_layers = []
        for i, stage in enumerate(stages):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for width in stage:
                layers += [_conv3x3(cin, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                cin = width
            if i > 0:  # the first stage is RepDistiller's f0, the stem's place in the ResNets' lists
                self.stage_layers.append(f"features.{len(layers) - 1}")
        self.features = nn.Sequential(*layers)
        self._finish(num_classes, in_chans, cin)


_PLAIN = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


@MODELS.register("resnet8")
def resnet8(num_classes: int, in_chans: int = 3) -> ResNet:
    return ResNet(1, _PLAIN, num_classes, in_chans)


@MODELS.register("resnet14")
def resnet14(num_classes: int, in_chans: int = 3) -> ResNet:
    return ResNet(2, _PLAIN, num_classes, in_chans)


@MODELS.register("resnet20")
def resnet20(num_classes: int, in_chans: int = 3) -> ResNet:
    return ResNet(3, _PLAIN, num_classes, in_chans)


@MODELS.register("resnet32")
def resnet32(num_classes: int, in_chans: int = 3) -> ResNet:
    return ResNet(5, _PLAIN, num_classes, in_chans)


@MODELS.register("resnet56")
def resnet56(num_classes: int, in_chans: int = 3) -> ResNet:
    return ResNet(9, _PLAIN, num_classes, in_chans)


@MODELS.register("resnet8x4")
def resnet8x4(num_classes: int, in_chans: int = 3) -> ResNet:
    return ResNet(1, _X4, num_classes, in_chans)


@MODELS.register("resnet32x4")
def resnet32x4(num_classes: int, in_chans: int = 3) -> ResNet:
    return ResNet(5, _X4, num_classes, in_chans)


@MODELS.register("wrn_16_2")
def wrn_16_2(num_classes: int, in_chans: int = 3) -> WideResNet:
    return WideResNet(16, 2, num_classes, in_chans)


@MODELS.register("wrn_40_2")
def wrn_40_2(num_classes: int, in_chans: int = 3) -> WideResNet:
    return WideResNet(40, 2, num_classes, in_chans)


@MODELS.register("vgg8")
def vgg8(num_classes: int, in_chans: int = 3) -> VGG:
    return VGG(((64,), (128,), (256,), (512,), (512,)), num_classes, in_chans)
