"""Client side: join, fine-tune on private labelled data, evaluate. Transport-free functions of
(private data, message from the server) -> message to the server; only weights, counts and
metrics leave the client, never an image or a label.

:func:`serve` is a site's one entry point for a message: the in-process transport and the Flower
ClientApp both call it, so a site does the same work whichever way the message came.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from medveil.federated.calibration import local_calibrate
from medveil.federated.messages import ClientUpdate, EvalReport, FitInstructions, JoinRequest
from medveil.federated.rebuild import received_models
from medveil.federated.sites import ClientData
from medveil.federated.training import TrainRecipe, predict_logits, train_classifier

FIT, CALIBRATE, EVALUATE = "fit", "calibrate", "evaluate"
WORKS = (FIT, CALIBRATE, EVALUATE)
LocalFit = Callable[..., ClientUpdate]  # (data, instructions, recipe, seed, device=) -> update


@dataclass
class ClientJob:
    """One message's work for a client.

    ``work``: ``fit`` (fine-tune backbone + head), ``calibrate`` (refit the head only on the
    received backbone, :mod:`.calibration`) or ``evaluate`` (test metrics of the received model,
    nothing trained). ``evaluate_first``: with fit / calibrate, first report the received
    model's test metrics (the previous stage's universal model, :mod:`.stage_evaluation`) in the
    same reply. ``seed`` is derived from (seed, stage, client); ``recipe`` is the ``[local]``
    recipe (needed to train).
    """

    instructions: FitInstructions
    work: str = FIT
    seed: int = 0
    recipe: TrainRecipe | None = None
    evaluate_first: bool = False

    def __post_init__(self) -> None:
        if self.work not in WORKS:
            raise ValueError(f"unknown client work {self.work!r} (one of {', '.join(WORKS)})")
        if self.work != EVALUATE and self.recipe is None:
            raise ValueError(f"client work {self.work!r} needs a training recipe")

    @property
    def client_name(self) -> str:
        return self.instructions.client_name


@dataclass
class ClientReply:
    """What a client sends back for a job: its update (fit / calibrate) and / or its report."""

    update: ClientUpdate | None = None
    report: EvalReport | None = None


def join_request(data: ClientData) -> JoinRequest:
    """What a client tells the server on joining: its class count (plus task type and names)."""
    return JoinRequest(client_name=data.name, num_classes=data.num_classes,
                       task=data.task.value, class_names=tuple(data.class_names))


def local_fit(data: ClientData, ins: FitInstructions, recipe: TrainRecipe, seed: int,
              device: str = "cpu") -> ClientUpdate:
    """Fine-tune backbone + head from the server's instructions for ``recipe.epochs`` epochs
    (FedProx term towards the received weights when ``recipe.fedprox_mu > 0``)."""
    backbone, head = received_models(data, ins, device)
    stats = train_classifier(backbone, head, data.x_train, data.y_train, data.task, recipe, seed,
                             augment=data.augmentation(recipe.augment))
    return ClientUpdate(
        client_name=data.name, stage=ins.stage,
        backbone={k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()},
        head={k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
        n_samples=len(data.x_train), metrics=stats,
    )


@torch.no_grad()
def local_evaluate(data: ClientData, ins: FitInstructions, device: str = "cpu") -> EvalReport:
    """Metrics of the received model (universal backbone + this client's head) on the test split."""
    from medveil.metrics import classification_metrics  # sklearn: ~1 s, only when evaluating

    backbone, head = received_models(data, ins, device)
    logits = predict_logits(backbone, head, data.x_test)
    metrics = classification_metrics(data.task.value, data.y_test.numpy(), logits.numpy())
    return EvalReport(client_name=data.name, stage=ins.stage, n_samples=len(data.x_test), metrics=metrics)


def calibration_of(fit: LocalFit) -> LocalFit:
    """The head refit that goes with a training function: its own ``calibrate`` (a DP site's:
    DP-SGD on the head) or the exact fit of :func:`local_calibrate`."""
    return getattr(fit, "calibrate", local_calibrate)


def serve(data: ClientData, job: ClientJob, device: str = "cpu", fit: LocalFit = local_fit) -> ClientReply:
    """A site's work for one message (``fit``: the local training function, replaceable by
    tests and baselines; calibration: :func:`calibration_of` it)."""
    if job.work == EVALUATE:
        return ClientReply(report=local_evaluate(data, job.instructions, device=device))
    report = local_evaluate(data, job.instructions, device=device) if job.evaluate_first else None
    train = calibration_of(fit) if job.work == CALIBRATE else fit
    return ClientReply(update=train(data, job.instructions, job.recipe, job.seed, device=device), report=report)
