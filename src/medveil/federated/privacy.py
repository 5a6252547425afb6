"""Differential privacy for a site's training: the ``[privacy]`` options and the site's ledger.

A site trains with DP-SGD (per-example gradients clipped to ``max_grad_norm``, Gaussian noise of
``noise_multiplier * max_grad_norm`` added to their sum, Poisson sampling of each batch with rate
``batch_size / n``), through Opacus (the ``dp`` extra): :mod:`medveil.federated.dp_training`.

The ledger is the site's own record of what it released: one entry per update it sent (stage,
a digest of the model it received, the work: a stage's training or the calibration round's head
refit, noise multiplier, sampling rate, DP-SGD steps), composed by
Opacus' RDP (default) or PRV accountant. It lives in the site's state folder (in-process: the
run's ``sites/<name>/``; across machines: ``medveil site start --state DIR``, one ledger per site
for every federation it joins), never on the server, and is written before the update leaves
the site. The noise of a release is seeded from the site's secret, the stage, the received
model and the work: the same release asked again with the same plan (a resumed run) gives the
same update, so its entry is replaced; asked again with another model, it is a new release and
is added; asked again with another plan (noise, rate or steps) or another setup (recipe, clipping
norm, learning rate, model shapes, training images: a changed config), it would reuse the first
one's noise draw on another function of the data, which could cancel it, so the site refuses. Before
training, the site checks that the ledger plus this release stays within ``target_epsilon``; if
not, it refuses and the server records it absent with the reason.

The noise multiplier, unless given, is the smallest that lets every planned release (``rounds``
stages of ``[local] epochs`` epochs, plus the calibration round's head refit of
``calibration_epochs`` epochs when the run calibrates heads and that is > 0) fit in
``target_epsilon`` (Opacus ``get_noise_multiplier``); every release uses it.
``delta`` defaults to 1 / (10 n) for a site holding n training images.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medveil.errors import ConfigError
from medveil.io import write_json_atomic

ACCOUNTANTS = ("rdp", "prv")
TRAINABLE = ("all", "head", "last_block", "norms_head")


def require_opacus() -> None:
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise ConfigError("[privacy] dp = true needs Opacus: pip install 'medveil[dp]'") from None


@dataclass
class PrivacyOptions:
    """The ``[privacy]`` config section."""

    dp: bool = False
    target_epsilon: float = 8.0
    delta: float = 0.0            # 0: 1 / (10 x the site's train count)
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0  # 0: the smallest that fits every planned stage in the target
    accountant: str = "rdp"       # "rdp" (Opacus RDPAccountant) or "prv" (PRVAccountant)
    trainable: str = "all"        # under DP: all | head | last_block | norms_head
    lr_scale: float = 4.0         # under DP the [local] lr times this: clipped, noised steps move less
                                  # (x4 chosen on validation: benchmarks/results/privacy_lr_validation.json)
    batch_size: int = 0           # expected DP-SGD batch (Poisson); 0: the [local] batch size
    calibration_epochs: int = 10  # with [federation] calibrate_heads: the last round's head refit runs as
                                  # DP-SGD on the head alone for this many epochs, planned in the budget
                                  # (0: the round is skipped under DP; 10 over 20: the audit's AUC lower
                                  # at the same val accuracy, 3 seeds: benchmarks/results/audit_grouped.json;
                                  # on test it cost 1.4 points: privacy_shipped.json, README)
    calibration_dims: int = 64    # the refit's coordinates: the pool's top whitened principal axes
    calibration_lr: float = 0.04  # AdamW rate of the refit on those (unit-variance) coordinates
    # (dims, rate and epochs chosen on validation splits: benchmarks/results/dp_head_refit_validation.json;
    # end to end: privacy_calibration_validation.json)

    def check(self, need_opacus: bool = True) -> None:
        """One ConfigError line for options that cannot be honoured; ``need_opacus``: this
        machine trains (a Flower coordinator does not)."""
        if not self.dp:
            return
        if not self.target_epsilon > 0 or math.isinf(self.target_epsilon):
            raise ConfigError(f"[privacy] target_epsilon must be > 0 and finite, got {self.target_epsilon}")
        if not 0 <= self.delta < 1:
            raise ConfigError(f"[privacy] delta must be in [0, 1) (0: 1 / (10 n)), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"[privacy] max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.noise_multiplier < 0:
            raise ConfigError(f"[privacy] noise_multiplier must be >= 0 (0: computed), got {self.noise_multiplier}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"[privacy] accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        if not self.lr_scale > 0 or math.isinf(self.lr_scale):
            raise ConfigError(f"[privacy] lr_scale must be > 0 and finite, got {self.lr_scale}")
        if self.batch_size < 0:
            raise ConfigError(f"[privacy] batch_size must be >= 0 (0: the [local] batch size), got {self.batch_size}")
        if self.calibration_epochs < 0 or self.calibration_epochs != int(self.calibration_epochs):
            raise ConfigError(f"[privacy] calibration_epochs must be a whole number >= 0, "
                              f"got {self.calibration_epochs}")
        if self.calibration_dims < 1:
            raise ConfigError(f"[privacy] calibration_dims must be >= 1, got {self.calibration_dims}")
        if not self.calibration_lr > 0 or math.isinf(self.calibration_lr):
            raise ConfigError(f"[privacy] calibration_lr must be > 0 and finite, got {self.calibration_lr}")
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"[privacy] trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        if need_opacus:
            require_opacus()

    def check_recipe(self, class_weighting: str, fedprox_mu: float) -> None:
        """What DP-SGD cannot honour: class weights computed from every private label (one
        example would move every other example's clipped gradient) and the FedProx term."""
        if not self.dp:
            return
        if class_weighting != "none":
            raise ConfigError("[privacy] dp = true needs [local] class_weighting = 'none': balanced weights are "
                              "computed from every private label, so one example would change the others' gradients")
        if fedprox_mu > 0:
            raise ConfigError("[privacy] dp = true cannot be combined with [local] fedprox_mu > 0")

    def plans_refit(self, calibrate_heads: bool) -> bool:
        """Under DP, whether a run that calibrates heads (or not) refits them by DP-SGD, planned
        in the noise from the start; without a refit the round is skipped under DP."""
        return self.dp and calibrate_heads and self.calibration_epochs > 0

    def site_delta(self, n_train: int) -> float:
        return self.delta if self.delta > 0 else 1.0 / (10 * max(n_train, 1))


def _release(entry: dict[str, Any]) -> tuple[Any, Any, str]:
    """What makes a release the same one (and seeds its noise): stage, received model, and the
    work (fit or calibrate)."""
    return entry["stage"], entry["model"], entry.get("work", "fit")


def _plan(entry: dict[str, Any]) -> tuple[float, float, int, Any]:
    """What makes two requests for one release the same update: the DP plan and the setup digest
    (everything else that shapes the update: recipe, options, data, shapes; absent in ledgers
    written before it existed, which therefore never match a new request)."""
    return float(entry["noise"]), float(entry["rate"]), int(entry["steps"]), entry.get("setup")


def make_accountant(kind: str) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if kind == "rdp" else PRVAccountant()


def epsilon_of(history: list[tuple[float, float, int]], delta: float, kind: str) -> float:
    """(epsilon, delta)-DP epsilon of DP-SGD runs composed: history of (noise, sample rate, steps)."""
    if not history:
        return 0.0
    acc = make_accountant(kind)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def plan_noise(opts: PrivacyOptions, sample_rate: float, steps_per_stage: int, stages: int, delta: float,
               calibration_steps: int = 0) -> float:
    """The noise multiplier for this site: the configured one, or the smallest that fits every
    planned release within ``target_epsilon``: ``stages`` stages of ``steps_per_stage`` DP-SGD
    steps, then (``calibration_steps`` > 0) the calibration round's head refit, all at the same
    sampling rate. One ConfigError line when even one stage would not fit."""
    planned = [(steps_per_stage, stages)] + ([(calibration_steps, 1)] if calibration_steps > 0 else [])

    def spent(sigma: float) -> float:
        return epsilon_of([(sigma, sample_rate, k) for k, times in planned for _ in range(times)], delta,
                          opts.accountant)

    if opts.noise_multiplier > 0:
        sigma = opts.noise_multiplier
    else:
        from opacus.accountants.utils import get_noise_multiplier

        try:
            sigma = float(get_noise_multiplier(target_epsilon=opts.target_epsilon, target_delta=delta,
                                               sample_rate=sample_rate,
                                               steps=sum(k * times for k, times in planned),
                                               accountant=opts.accountant))
        except ValueError as err:
            raise ConfigError(f"[privacy] no noise multiplier reaches epsilon {opts.target_epsilon} "
                              f"in {stages} stage(s) ({err})") from None
    one = epsilon_of([(sigma, sample_rate, steps_per_stage)], delta, opts.accountant)
    if one > opts.target_epsilon:
        raise ConfigError(f"[privacy] noise multiplier {sigma:g} spends epsilon {one:.2f} in one stage, over the "
                          f"target {opts.target_epsilon}; raise noise_multiplier or target_epsilon")
    if opts.noise_multiplier <= 0:  # the ledger composes release by release: make sure every planned one fits
        while spent(sigma) > opts.target_epsilon:
            sigma *= 1.01
    return sigma


@dataclass
class Ledger:
    """A site's DP spending: one entry per release (see the module docstring)."""

    site: str
    delta: float
    accountant: str
    target_epsilon: float
    source: str = ""  # the dataset this ledger spends for (a site's budget is its data's, whatever its name)
    # each release: {"stage", "model" (digest of the received model), "noise", "rate", "steps", "setup"
    # (digest of the recipe, options, data and shapes it was trained with)}, and "work": "calibrate"
    # for the calibration round's head refit
    entries: list[dict[str, Any]] = field(default_factory=list)

    def history(self, extra: dict[str, Any] | None = None) -> list[tuple[float, float, int]]:
        entries = self._with(extra) if extra else self.entries
        return [(float(e["noise"]), float(e["rate"]), int(e["steps"])) for e in entries]

    def _with(self, entry: dict[str, Any]) -> list[dict[str, Any]]:
        """The entries after ``entry``: it replaces the same release with the same plan (the same
        update again: same noise, nothing new leaks), else it is added."""
        same = [e for e in self.entries if _release(e) == _release(entry) and _plan(e) == _plan(entry)]
        return [e for e in self.entries if e not in same] + [entry]

    def conflict(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        """A recorded release of the same stage, received model and work with another plan: its
        noise draw is the one ``entry`` would use (module docstring); None if there is none."""
        return next((e for e in self.entries if _release(e) == _release(entry) and _plan(e) != _plan(entry)), None)

    def epsilon(self, extra: dict[str, Any] | None = None) -> float:
        """Epsilon spent (plus ``extra``, a release not yet made)."""
        return epsilon_of(self.history(extra), self.delta, self.accountant)

    def allows(self, entry: dict[str, Any]) -> tuple[bool, float]:
        """(making release ``entry`` keeps within the target, the epsilon it would reach)."""
        eps = self.epsilon(entry)
        return eps <= self.target_epsilon * (1 + 1e-6), eps

    def record(self, entry: dict[str, Any]) -> None:
        self.entries = self._with(entry)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "epsilon": self.epsilon()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Ledger:
        return cls(**{k: v for k, v in d.items() if k != "epsilon"})

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> Ledger | None:
        if not path.is_file():
            return None
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"{path}: unreadable privacy ledger ({err}); it must not be deleted or edited") from None
