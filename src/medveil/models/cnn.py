"""The convolutional networks a hospital would train alone on its own images: the baselines
every universal-model table is judged against.

- :class:`SmallCNN`: four blocks of two 3x3 convolutions with batch norm and ReLU (widths 32,
  64, 128, 128), 2x2 max-pool after the first three, global average pool, one linear layer;
  ~0.6 M parameters at 3 channels in. Trains in minutes on a laptop CPU.
- :class:`ResNet18`: the CIFAR-style ResNet-18 MedMNIST v2 uses at 28 px (Yang et al., Scientific
  Data 2023): a 3x3 stride-1 stem without max-pool, four stages of two BasicBlocks (64, 128,
  256, 512; stride 2 from the second stage), global average pool, linear; ~11 M parameters.

Both take float (B, C, H, W) in [0, 1] and normalise inside (per-channel mean 0.5, std 0.25),
like the ViT, so every model sees the same tensors.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CNN_ARCHS = ("small_cnn", "resnet18")


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _Normalised(nn.Module):
    """[0, 1] pixels -> (x - 0.5) / 0.25 before ``features``; ``head`` on the pooled features."""

    features: nn.Module
    head: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        f = self.features((x - 0.5) / 0.25)  # (B, D, h, w)
        return self.head(F.adaptive_avg_pool2d(f, 1).flatten(1))


class SmallCNN(_Normalised):
    def __init__(self, in_chans: int, num_classes: int, widths: tuple[int, ...] = (32, 64, 128, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for i, w in enumerate(widths):
            layers += [_conv_bn(cin, w), _conv_bn(w, w)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))  # 28 -> 14 -> 7 -> 3
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; identity or 1x1-projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, cin, H, W) -> (B, cout, H/s, W/s)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(_Normalised):
    def __init__(self, in_chans: int, num_classes: int, widths: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(in_chans, widths[0])]
        cin = widths[0]
        for i, w in enumerate(widths):
            layers += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)


def build_cnn(arch: str, in_chans: int, num_classes: int) -> nn.Module:
    if arch == "small_cnn":
        return SmallCNN(in_chans, num_classes)
    if arch == "resnet18":
        return ResNet18(in_chans, num_classes)
    raise ValueError(f"unknown CNN {arch!r} (one of {', '.join(CNN_ARCHS)})")
