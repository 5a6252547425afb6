"""A site's side of differential privacy: its secret, its ledger, and its DP training step.

:class:`DPSites` is the ``LocalFit`` of a run with ``[privacy] dp = true``. For each site it keeps
a state folder (in-process: ``RUN/sites/<name>/``) holding

- ``secret``: 63 random bits made once with :mod:`secrets`; the DP noise and Poisson sampling of
  a release are seeded from (secret, stage, received model), so the server, which knows every
  other seed, cannot reproduce or subtract the noise, while a resumed run re-trains a stage to
  the same update;
- ``privacy.json``: the :class:`~medveil.federated.privacy.Ledger` (delta, and per release: the
  stage, a digest of the received model, noise multiplier, sampling rate, steps; epsilon so far),
  written before the update leaves.

Before training, the site checks the ledger: if this stage would take it past ``target_epsilon``
it raises :class:`~medveil.errors.SiteRefused` and the server records it absent with the reason.
The update's ``fit`` metrics carry only public parameters: ``epsilon`` (spent so far, this
release included), ``delta``, ``noise_multiplier``, ``sample_rate``; never the training loss.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import replace
from pathlib import Path

from medveil.errors import ConfigError, SiteRefused
from medveil.federated.dp_training import dp_plan, dp_recipe, dp_train_classifier, wide_seed
from medveil.federated.messages import ClientUpdate, FitInstructions
from medveil.federated.privacy import Ledger, PrivacyOptions, plan_noise
from medveil.federated.rebuild import received_models
from medveil.federated.sites import ClientData
from medveil.federated.training import TrainRecipe
from medveil.federated.server import clone_state
from medveil.io import write_text_atomic


def site_secret(state: Path) -> int:
    """The site's secret seed (made on first use, then read back)."""
    path = state / "secret"
    if not path.is_file():
        write_text_atomic(path, f"{secrets.randbits(63)}\n")
    try:
        return int(path.read_text().strip())
    except ValueError:
        raise ConfigError(f"{path}: not a site secret; it must not be edited") from None


def model_digest(ins: FitInstructions) -> str:
    """SHA-256 (16 hex) of the model a site received: its backbone and head tensors, by key."""
    h = hashlib.sha256()
    for part in (ins.backbone, ins.head):
        for key in sorted(part):
            h.update(key.encode())
            h.update(part[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class DPSites:
    """``LocalFit`` under DP (one state folder per site under ``root``). ``max_epsilon``: the
    site's own ceiling (a Flower site's node config); the stricter of it and the run's target holds."""

    def __init__(self, opts: PrivacyOptions, root: Path, planned_stages: int, max_epsilon: float = 0.0) -> None:
        self.opts, self.root, self.planned_stages = opts, Path(root), max(1, planned_stages)
        self.target = min(opts.target_epsilon, max_epsilon) if max_epsilon > 0 else opts.target_epsilon

    def ledger(self, data: ClientData) -> Ledger:
        found = Ledger.load(self.root / data.name / "privacy.json")
        if found is not None:
            found.target_epsilon = min(found.target_epsilon, self.target)  # a ceiling never rises
            return found
        return Ledger(site=data.name, delta=self.opts.site_delta(len(data.x_train)), accountant=self.opts.accountant,
                      target_epsilon=self.target)

    def __call__(self, data: ClientData, ins: FitInstructions, recipe: TrainRecipe, seed: int,
                 device: str = "cpu") -> ClientUpdate:
        state = self.root / data.name
        ledger = self.ledger(data)
        q, steps = dp_plan(len(data.x_train), dp_recipe(recipe, self.opts))
        planned = replace(self.opts, target_epsilon=ledger.target_epsilon)
        sigma = plan_noise(planned, q, steps, self.planned_stages, ledger.delta)
        entry = {"stage": ins.stage, "model": model_digest(ins), "noise": sigma, "rate": q, "steps": steps}
        ok, eps = ledger.allows(entry)
        if not ok:
            raise SiteRefused(f"privacy budget: stage {ins.stage} would bring epsilon to {eps:.2f}, over the "
                              f"target {ledger.target_epsilon} (spent {ledger.epsilon():.2f})")
        backbone, head = received_models(data, ins, device)
        secret = wide_seed(site_secret(state), ins.stage, entry["model"])
        dp_train_classifier(backbone, head, data.x_train, data.y_train, data.task, recipe, self.opts, sigma, secret,
                            augment=data.augmentation(recipe.augment))
        ledger.record(entry)
        ledger.save(state / "privacy.json")  # before the update leaves the site
        return ClientUpdate(
            client_name=data.name, stage=ins.stage, backbone=clone_state(backbone.state_dict()),
            head=clone_state(head.state_dict()), n_samples=len(data.x_train),
            # public parameters only: the training loss is a statistic of the private data
            metrics={"epsilon": ledger.epsilon(), "delta": ledger.delta, "noise_multiplier": sigma,
                     "sample_rate": q, "dp_steps": float(steps)},
        )
