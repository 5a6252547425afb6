"""A small CNN classifier: the fixed "downstream model" that rates a training set's utility
(the same architecture and recipe is trained on every candidate set and tested on real images)."""

from __future__ import annotations

import torch
import torch.nn as nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class SmallCNN(nn.Module):
    """4 x (conv3x3-BN-ReLU-maxpool) with widths w, 2w, 4w, 8w -> global average pool ->
    dropout -> linear. (B, C, H, W) in [0, 1] (H, W >= 16) -> logits (B, num_classes)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5, width: int = 16,
                 dropout: float = 0.2) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(4)]
        chans = [in_channels, *widths]
        self.features = nn.Sequential(*(_block(a, b) for a, b in zip(chans[:-1], chans[1:])))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(widths[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features((x - 0.5) / 0.25)  # (B, 8w, H/16, W/16)
        return self.head(h.mean(dim=(2, 3)))  # (B, num_classes)
