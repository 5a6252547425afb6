"""A site's side of differential privacy: its secret, its ledger, and its DP training step.

:class:`DPSites` is the ``LocalFit`` of a run with ``[privacy] dp = true``. For each site it keeps
a state folder (in-process: ``RUN/sites/<name>/``) holding

- ``secret``: 63 random bits made once with :mod:`secrets`; the DP noise and Poisson sampling of
  a stage are seeded from (secret, stage), so the server, which knows every other seed, cannot
  reproduce or subtract the noise, while a resumed run re-trains a stage to the same update;
- ``privacy.json``: the :class:`~medveil.federated.privacy.Ledger` (noise multiplier, sampling
  rate, delta, steps per stage trained, epsilon so far), written before the update leaves.

Before training, the site checks the ledger: if this stage would take it past ``target_epsilon``
it raises :class:`~medveil.errors.SiteRefused` and the server records it absent with the reason.
The update's ``fit`` metrics carry ``epsilon`` (spent so far, this stage included), ``delta``,
``noise_multiplier`` and ``sample_rate``: they land in ``metrics.json`` per site and stage.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path
from typing import Any

from medveil.errors import ConfigError, SiteRefused
from medveil.federated.dp_training import dp_plan, dp_train_classifier
from medveil.federated.messages import ClientUpdate, FitInstructions
from medveil.federated.privacy import Ledger, PrivacyOptions, plan_noise
from medveil.federated.rebuild import received_models
from medveil.federated.sites import ClientData
from medveil.federated.training import TrainRecipe, derive_seed
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


class DPSites:
    """``LocalFit`` under DP for the in-process engine (one state folder per site under ``root``)."""

    def __init__(self, opts: PrivacyOptions, root: Path, planned_stages: int) -> None:
        self.opts, self.root, self.planned_stages = opts, Path(root), max(1, planned_stages)

    def ledger(self, data: ClientData, recipe: TrainRecipe) -> Ledger:
        path = self.root / data.name / "privacy.json"
        found = Ledger.load(path)
        if found is not None:
            return found
        n = len(data.x_train)
        q, steps = dp_plan(n, recipe)
        delta = self.opts.site_delta(n)
        sigma = plan_noise(self.opts, q, steps, self.planned_stages, delta)
        return Ledger(site=data.name, delta=delta, noise_multiplier=sigma, sample_rate=q,
                      accountant=self.opts.accountant, target_epsilon=self.opts.target_epsilon)

    def __call__(self, data: ClientData, ins: FitInstructions, recipe: TrainRecipe, seed: int,
                 device: str = "cpu") -> ClientUpdate:
        state = self.root / data.name
        ledger = self.ledger(data, recipe)
        _, steps = dp_plan(len(data.x_train), recipe)
        ok, eps = ledger.allows(ins.stage, steps)
        if not ok:
            raise SiteRefused(f"privacy budget: stage {ins.stage} would bring epsilon to {eps:.2f}, over the "
                              f"target {ledger.target_epsilon} (spent {ledger.epsilon():.2f})")
        backbone, head = received_models(data, ins, device)
        stats = dp_train_classifier(backbone, head, data.x_train, data.y_train, data.task, recipe, self.opts,
                                    ledger.noise_multiplier, derive_seed(site_secret(state), ins.stage),
                                    augment=data.augmentation(recipe.augment))
        ledger.record(ins.stage, steps)
        ledger.save(state / "privacy.json")  # before the update leaves the site
        return ClientUpdate(
            client_name=data.name, stage=ins.stage,
            backbone={k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()},
            head={k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
            n_samples=len(data.x_train),
            metrics={"train_loss": stats["train_loss"], "epsilon": ledger.epsilon(), "delta": ledger.delta,
                     "noise_multiplier": ledger.noise_multiplier, "sample_rate": ledger.sample_rate,
                     "dp_steps": float(steps)},
        )


def federation_key(site_options: dict[str, Any]) -> str:
    """A short name for one federation as a site sees it (its data options, seed and privacy
    settings): a Flower site keeps one secret and ledger per federation under its state folder."""
    return hashlib.sha256(json.dumps(site_options, sort_keys=True).encode()).hexdigest()[:16]
