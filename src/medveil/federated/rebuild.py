"""Models rebuilt from the state dicts a message carries: the backbone and a client's head of
the server's instructions (client side), a client's returned backbone and head (the server's
teachers in curation), the universal model's parts (evaluation)."""

from __future__ import annotations

import torch.nn as nn

from medveil.errors import DataError
from medveil.federated.messages import FitInstructions, StateDict
from medveil.federated.sites import ClientData
from medveil.models import ViTConfig, VisionTransformer


def build_backbone(model_config: dict, state: StateDict) -> VisionTransformer:
    """A headless ViT with the given encoder weights (strict: every key must match)."""
    backbone = VisionTransformer(ViTConfig.from_dict(model_config), num_classes=0)
    backbone.load_state_dict(state, strict=True)
    return backbone.eval()


def build_head(state: StateDict, num_classes: int, where: str) -> nn.Linear:
    """A linear head from its state; its output count must equal the dataset's class count."""
    weight = state["weight"]
    if weight.shape[0] != num_classes:
        raise DataError(f"{where}: the dataset has {num_classes} classes but its head has "
                        f"{weight.shape[0]} outputs")
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict(state, strict=True)
    return head.eval()


def received_models(data: ClientData, ins: FitInstructions, device: str) -> tuple[VisionTransformer, nn.Linear]:
    """The backbone and this client's head from the server's message (class count checked)."""
    backbone = build_backbone(ins.model_config, ins.backbone).to(device)
    head = build_head(ins.head, data.num_classes, f"{data.source}: client {data.name!r}").to(device)
    return backbone, head
