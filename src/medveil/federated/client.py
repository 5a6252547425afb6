"""Client side: join, fine-tune on private labelled data, evaluate. Transport-free functions of
(private data, message from the server) -> message to the server; only weights, counts and
metrics leave the client, never an image or a label.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from medveil.errors import DataError
from medveil.federated.messages import ClientUpdate, EvalReport, FitInstructions, JoinRequest, StateDict
from medveil.federated.sites import ClientData
from medveil.federated.training import TrainRecipe, predict_logits, train_classifier
from medveil.models import ViTConfig, VisionTransformer


def join_request(data: ClientData) -> JoinRequest:
    """What a client tells the server on joining: its class count (plus task type and names)."""
    return JoinRequest(client_name=data.name, num_classes=data.num_classes,
                       task=data.task.value, class_names=tuple(data.class_names))


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


def local_fit(data: ClientData, ins: FitInstructions, recipe: TrainRecipe, seed: int,
              device: str = "cpu") -> ClientUpdate:
    """Fine-tune backbone + head from the server's instructions for ``recipe.epochs`` epochs
    (FedProx term towards the received weights when ``recipe.fedprox_mu > 0``)."""
    backbone, head = received_models(data, ins, device)
    stats = train_classifier(backbone, head, data.x_train, data.y_train, data.task, recipe, seed)
    return ClientUpdate(
        client_name=data.name, stage=ins.stage,
        backbone={k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()},
        head={k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
        n_samples=len(data.x_train), metrics=stats,
    )


@torch.no_grad()
def local_evaluate(data: ClientData, ins: FitInstructions, device: str = "cpu") -> EvalReport:
    """Metrics of the received model (universal backbone + this client's head) on the test split."""
    from medveil.evaluate.metrics import classification_metrics  # sklearn: ~1 s, only when evaluating

    backbone, head = received_models(data, ins, device)
    logits = predict_logits(backbone, head, data.x_test)
    metrics = classification_metrics(data.task.value, data.y_test.numpy(), logits.numpy())
    return EvalReport(client_name=data.name, stage=ins.stage, n_samples=len(data.x_test), metrics=metrics)
