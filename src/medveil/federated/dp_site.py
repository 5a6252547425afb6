"""A site's side of differential privacy: its secret, its ledger, and its DP training step.

:class:`DPSites` is the ``LocalFit`` of a run with ``[privacy] dp = true``. For each site it keeps
a state folder (in-process: ``RUN/sites/<name>/``) holding

- ``secret``: 63 random bits made once with :mod:`secrets`; the DP noise and Poisson sampling of
  a release are seeded from (secret, stage, received model), so the server, which knows every
  other seed, cannot reproduce or subtract the noise, while a resumed run re-trains a stage to
  the same update;
- ``privacy.json``: the :class:`~medveil.federated.privacy.Ledger` (delta, the dataset it spends
  for, and per release: the stage, a digest of the received model, a digest of its setup (recipe,
  options, shapes, training data: :func:`setup_digest`), noise multiplier, sampling rate, steps;
  epsilon so far), written before the update leaves, under the state folder's lock
  (``privacy.lock``) held from the budget check on, so two trainings at once cannot spend the same room.

Before training, the site checks the ledger: if this stage would take it past ``target_epsilon``
it raises :class:`~medveil.errors.SiteRefused` and the server records it absent with the reason.

The calibration round (``[federation] calibrate_heads``) under DP: with ``[privacy]
calibration_epochs`` > 0 the site refits its head on the final backbone's features by DP-SGD on
the head alone (:func:`~medveil.federated.dp_training.dp_fit_head`) in the public basis the
server computed on its pool (:mod:`~medveil.federated.feature_basis`), folded back to a head on
raw features: a release of its own in the ledger (``"work": "calibrate"``), planned in the noise
from the start (``planned_calibration``); with 0 it refuses, and the server skips the round.
The update's ``fit`` metrics carry only public parameters: ``epsilon`` (spent so far, this
release included), ``delta``, ``noise_multiplier``, ``sample_rate``; never the training loss.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch.nn as nn

from medveil.errors import ConfigError, SiteRefused
from medveil.federated.dp_training import dp_fit_head, dp_plan, dp_recipe, dp_train_classifier, wide_seed
from medveil.federated.feature_basis import fold_head, to_basis
from medveil.federated.messages import ClientUpdate, FitInstructions
from medveil.federated.privacy import Ledger, PrivacyOptions, plan_noise
from medveil.federated.rebuild import received_models
from medveil.federated.server import clone_state
from medveil.federated.sites import ClientData
from medveil.federated.training import TrainRecipe, extract_features, new_head
from medveil.io import write_text_atomic
from medveil.models import VisionTransformer


def site_secret(state: Path) -> int:
    """The site's secret seed (made on first use, then read back)."""
    path = state / "secret"
    if not path.is_file():
        write_text_atomic(path, f"{secrets.randbits(63)}\n")
    try:
        return int(path.read_text().strip())
    except ValueError:
        raise ConfigError(f"{path}: not a site secret; it must not be edited") from None


def setup_digest(data: ClientData, ins: FitInstructions, recipe: TrainRecipe, opts: PrivacyOptions,
                 work: str) -> str:
    """SHA-256 (16 hex) of everything besides the received model's values and the DP plan that
    shapes a release: the recipe as DP-SGD runs it, the privacy options (not the target: it moves
    only the noise, which the plan holds), the received tensors' keys, shapes and dtypes, and the
    training images and labels. Two requests for one release that differ here would share a noise
    draw on two different functions of the data, so the ledger refuses the second."""
    h = hashlib.sha256()
    options = {k: v for k, v in asdict(opts).items() if k != "target_epsilon"}
    h.update(json.dumps({"work": work, "recipe": asdict(dp_recipe(recipe, opts)), "options": options},
                        sort_keys=True, default=str).encode())
    for part in (ins.backbone, ins.head, ins.features):
        for key in sorted(part):
            h.update(f"{key}{tuple(part[key].shape)}{part[key].dtype}".encode())
    for t in (data.x_train, data.y_train):
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_digest(ins: FitInstructions) -> str:
    """SHA-256 (16 hex) of the model a site received: its backbone and head tensors (and any
    feature basis), by key."""
    h = hashlib.sha256()
    for part in (ins.backbone, ins.head, ins.features):
        for key in sorted(part):
            h.update(key.encode())
            h.update(part[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class DPSites:
    """``LocalFit`` under DP (one state folder per site under ``root``). ``max_epsilon``: the
    site's own ceiling (a Flower site's node config); the stricter of it and the run's target holds.
    ``planned_calibration``: the run ends with a calibration round (planned in the noise when
    ``opts.calibration_epochs`` > 0)."""

    def __init__(self, opts: PrivacyOptions, root: Path, planned_stages: int, max_epsilon: float = 0.0,
                 planned_calibration: bool = False) -> None:
        self.opts, self.root, self.planned_stages = opts, Path(root), max(1, planned_stages)
        self.target = min(opts.target_epsilon, max_epsilon) if max_epsilon > 0 else opts.target_epsilon
        self.planned_calibration = replace(opts, dp=True).plans_refit(planned_calibration)

    def ledger(self, data: ClientData) -> Ledger:
        """The site's ledger (new on first use); refuses a delta above 1/n (n: the site's
        training images; such a delta allows a release that names a patient) and a dataset whose
        budget is already spent under another site name in this state folder."""
        found = Ledger.load(self.root / data.name / "privacy.json")
        source = str(Path(data.source).resolve())
        for other in sorted(self.root.glob("*/privacy.json")):
            if other.parent.name != data.name:
                try:
                    them = Ledger.load(other)
                except ConfigError:  # another site's unreadable ledger is that site's refusal, not this one's
                    continue
                if them is not None and them.source == source:
                    raise SiteRefused(f"privacy: {source} already spends its budget as site {them.site!r} in "
                                      f"{self.root}; one dataset has one ledger, whatever the site is called")
        if found is None:
            found = Ledger(site=data.name, delta=self.opts.site_delta(len(data.x_train)),
                           accountant=self.opts.accountant, target_epsilon=self.target, source=source)
        found.target_epsilon = min(found.target_epsilon, self.target)  # a ceiling never rises
        found.source = found.source or source
        n = len(data.x_train)
        if found.delta * n > 1:
            raise SiteRefused(f"privacy: delta {found.delta:.3g} is above 1/n = {1 / n:.3g} for this site's {n} "
                              f"training images: such a guarantee allows releasing a patient's record outright "
                              f"(default: 1 / (10 n))")
        return found

    @contextmanager
    def _locked(self, data: ClientData) -> Iterator[None]:
        """Hold the state folder's ledgers from a release's check to its record: two trainings at
        once (two federations, a stage sent again while one still trains, or one dataset under two
        names) would both be admitted against the same spending, and the last save would drop the
        other's release. One lock for the folder (a site machine trains one release at a time)."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # not POSIX: one training at a time is then up to the operator
            yield
            return
        with open(self.root / "privacy.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _plan(self, data: ClientData, recipe: TrainRecipe, ledger: Ledger) -> tuple[float, float, int, int]:
        """(noise multiplier, sampling rate, steps of a stage, steps of the calibration refit)."""
        dp = dp_recipe(recipe, self.opts)
        q, steps = dp_plan(len(data.x_train), dp)
        calib = dp_plan(len(data.x_train), replace(dp, epochs=self.opts.calibration_epochs))[1]
        planned = replace(self.opts, target_epsilon=ledger.target_epsilon)
        sigma = plan_noise(planned, q, steps, self.planned_stages, ledger.delta,
                           calib if self.planned_calibration else 0)
        return sigma, q, steps, calib

    def _admit(self, ledger: Ledger, entry: dict) -> None:
        what = "the head calibration" if entry.get("work") == "calibrate" else f"stage {entry['stage']}"
        clash = ledger.conflict(entry)
        if clash is not None:
            raise SiteRefused(f"privacy: {what} was already released from this model with another DP plan or setup "
                              f"(noise {clash['noise']:.4g}, rate {clash['rate']:.4g}, {clash['steps']} steps, setup "
                              f"{clash.get('setup')}; now {entry['noise']:.4g}, {entry['rate']:.4g}, {entry['steps']}, "
                              f"{entry['setup']}): a second release would reuse its noise draw")
        ok, eps = ledger.allows(entry)
        if not ok:
            raise SiteRefused(f"privacy budget: {what} would bring epsilon to {eps:.2f}, over the "
                              f"target {ledger.target_epsilon} (spent {ledger.epsilon():.2f})")

    def _release(self, data: ClientData, ledger: Ledger, entry: dict, ins: FitInstructions,
                 backbone: VisionTransformer | None, head: nn.Linear) -> ClientUpdate:
        """Record the release in the ledger (saved before the update leaves) and make the update."""
        ledger.record(entry)
        ledger.save(self.root / data.name / "privacy.json")  # before the update leaves the site
        return ClientUpdate(
            client_name=data.name, stage=ins.stage, backbone=clone_state(backbone.state_dict()) if backbone else {},
            head=clone_state(head.state_dict()), n_samples=len(data.x_train),
            # public parameters only: the training loss is a statistic of the private data
            metrics={"epsilon": ledger.epsilon(), "delta": ledger.delta, "noise_multiplier": entry["noise"],
                     "sample_rate": entry["rate"], "dp_steps": float(entry["steps"])},
        )

    def __call__(self, data: ClientData, ins: FitInstructions, recipe: TrainRecipe, seed: int,
                 device: str = "cpu") -> ClientUpdate:
        with self._locked(data):
            return self._fit(data, ins, recipe, device)

    def _admitted(self, data: ClientData, ins: FitInstructions, recipe: TrainRecipe,
                  work: str) -> tuple[Ledger, dict]:
        """The site's ledger and this release's entry (``work``: "fit" or "calibrate"), once the
        ledger admits it (:meth:`_admit`)."""
        ledger = self.ledger(data)
        sigma, q, fit_steps, calibrate_steps = self._plan(data, recipe, ledger)
        entry = {"stage": ins.stage, "model": model_digest(ins), "noise": sigma, "rate": q,
                 "steps": calibrate_steps if work == "calibrate" else fit_steps,
                 "setup": setup_digest(data, ins, recipe, self.opts, work)}
        if work == "calibrate":
            entry["work"] = work
        self._admit(ledger, entry)
        return ledger, entry

    def _fit(self, data: ClientData, ins: FitInstructions, recipe: TrainRecipe, device: str) -> ClientUpdate:
        ledger, entry = self._admitted(data, ins, recipe, "fit")
        backbone, head = received_models(data, ins, device)
        secret = wide_seed(site_secret(self.root / data.name), ins.stage, entry["model"])
        dp_train_classifier(backbone, head, data.x_train, data.y_train, data.task, recipe, self.opts, entry["noise"],
                            secret, augment=data.augmentation(recipe.augment))
        return self._release(data, ledger, entry, ins, backbone, head)

    def calibrate(self, data: ClientData, ins: FitInstructions, recipe: TrainRecipe, seed: int,
                  device: str = "cpu") -> ClientUpdate:
        """The calibration round under DP: a head fitted by DP-SGD on the received backbone's
        features in the received feature basis, folded back to raw features (a head-only update;
        without a basis, the received head refit on raw features); refused when the run did not
        plan it."""
        if not self.planned_calibration:
            raise SiteRefused("a head refit on private labels is not covered by the privacy budget: the run did not "
                              "plan it in its noise ([privacy] calibration_epochs = 0, or the sites' training was "
                              "set up without planned_calibration)")
        with self._locked(data):
            return self._calibrate(data, ins, recipe, device)

    def _calibrate(self, data: ClientData, ins: FitInstructions, recipe: TrainRecipe, device: str) -> ClientUpdate:
        ledger, entry = self._admitted(data, ins, recipe, "calibrate")
        backbone, received = received_models(data, ins, device)
        secret = wide_seed(site_secret(self.root / data.name), ins.stage, entry["model"], "calibrate")
        z = to_basis(extract_features(backbone, data.x_train), ins.features)
        # in the pool's basis: a fresh head (the received one lives on raw features); without one, the received head
        head = new_head(z.shape[1], data.num_classes, secret & 0x7FFFFFFF) if ins.features else received
        dp_fit_head(head, z, data.y_train, data.task, recipe, self.opts, entry["noise"], secret)
        received.load_state_dict(fold_head(head, ins.features))
        return self._release(data, ledger, entry, ins, None, received)
