"""StyleGAN2(-ADA) training loop: non-saturating logistic loss, lazy R1, EMA generator,
style mixing, differentiable augmentation with the ADA controller.

Run directory layout::

    RUN_DIR/config.toml            the TrainConfig (TOML)
    RUN_DIR/metrics.jsonl          one JSON row per log interval ("train") / evaluation ("eval")
    RUN_DIR/summary.json           written at the end: losses, p, throughput, last FID/KID
    RUN_DIR/curves.png             losses, p / r_t and FID/KID over steps
    RUN_DIR/samples/step_XXXXXX.png  EMA-generator grids from a fixed z (also latest.png)
    RUN_DIR/checkpoints/latest.pt  G, D, G_ema, optimisers, ADA state, sampler, RNG, step

All randomness goes through the global RNGs, which the checkpoint stores, so
``train N`` and ``train N/2, kill, resume to N`` give identical weights (same device/threads).
FID/KID are not computed here (the evaluate layer sits above this one): pass an
``evaluator(G_ema) -> dict`` (e.g. :class:`medveil.evaluate.fidelity.FidelityEvaluator`).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from medveil.errors import ConfigError
from medveil.generative.augment import AdaptiveP, augment
from medveil.generative.checkpoint import (
    config_mismatch, load_checkpoint, rng_state, seed_everything, set_rng_state,
)
from medveil.io import save_torch_atomic, write_json_atomic, write_text_atomic
from medveil.generative.config import TrainConfig, save_train_config
from medveil.generative.figures import plot_curves, read_metrics, save_grid
from medveil.generative.throughput import count_flops, throughput_report
from medveil.models.stylegan2 import Generator
from medveil.models.stylegan2_discriminator import Discriminator
from medveil.progress import bar as progress_bar

Evaluator = Callable[[Generator], dict[str, Any]]


class EpochSampler:
    """Shuffled batches without replacement, reshuffling each epoch; resumable state."""

    def __init__(self, n: int, batch: int) -> None:
        self.n, self.batch = n, batch
        self.perm = torch.randperm(n)
        self.pos = 0

    def next(self) -> torch.Tensor:  # (batch,) indices
        out = []
        need = self.batch
        while need:
            if self.pos >= self.n:
                self.perm, self.pos = torch.randperm(self.n), 0
            take = self.perm[self.pos:self.pos + need]
            out.append(take)
            self.pos += len(take)
            need -= len(take)
        return torch.cat(out)

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.perm, self.pos = d["perm"].clone(), int(d["pos"])


class GANTrainer:
    def __init__(self, images: torch.Tensor, cfg: TrainConfig, run_dir: str | Path,
                 evaluator: Evaluator | None = None, device: str | torch.device | None = None,
                 progress: bool | None = None, measure_throughput: bool = True,
                 curves: bool = True) -> None:
        g = cfg.gan
        if images.ndim != 4 or images.shape[1:] != (g.img_channels, g.resolution, g.resolution):
            raise ConfigError(
                f"training images have shape {tuple(images.shape)}, the GAN expects "
                f"(N, {g.img_channels}, {g.resolution}, {g.resolution}) in [0, 1]")
        if images.shape[0] < 2:
            raise ConfigError("GAN training needs at least 2 images")
        self.cfg, self.evaluator, self.progress = cfg, evaluator, progress
        self.measure_throughput, self.curves = measure_throughput, curves
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.run_dir = Path(run_dir)
        self.ckpt_path = self.run_dir / "checkpoints" / "latest.pt"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.reals = (images.float() * 2 - 1).to(self.device)  # (N, C, R, R) in [-1, 1]

        seed_everything(cfg.seed)
        self.G = Generator(g).to(self.device)
        self.D = Discriminator(g).to(self.device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=betas, eps=1e-8)
        c = cfg.r1_interval / (cfg.r1_interval + 1)  # lazy-regularisation correction
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr * c,
                                      betas=(cfg.beta1**c, cfg.beta2**c), eps=1e-8)
        p0 = cfg.aug_p if cfg.augment != "none" else 0.0
        self.ada = AdaptiveP(cfg.ada_target, cfg.ada_interval, cfg.ada_kimg, p=p0)
        self.sampler = EpochSampler(len(self.reals), cfg.batch)
        gen = torch.Generator().manual_seed(cfg.seed + 12345)
        self.grid_z = torch.randn(cfg.grid_size, g.z_dim, generator=gen)
        self.step = 0
        self.nimg = 0
        self.last_r1 = float("nan")

    # ------------------------------------------------------------------ one step
    def _ws(self, z: torch.Tensor) -> torch.Tensor:
        """Mapping with style mixing: (B, z_dim) -> (B, num_ws, w_dim)."""
        G, cfg = self.G, self.cfg
        ws = G.broadcast(G.mapping(z))
        if cfg.mixing_prob > 0:
            cutoff = torch.randint(1, G.num_ws, (z.shape[0], 1), device=z.device)
            mix = torch.rand(z.shape[0], 1, device=z.device) < cfg.mixing_prob
            cutoff = torch.where(mix, cutoff, torch.full_like(cutoff, G.num_ws))
            ws2 = G.broadcast(G.mapping(torch.randn_like(z)))
            layer = torch.arange(G.num_ws, device=z.device)[None, :]  # (1, num_ws)
            ws = torch.where((layer < cutoff)[:, :, None], ws, ws2)
        return ws

    def _aug(self, x: torch.Tensor) -> torch.Tensor:
        return augment(x, self.ada.p) if self.cfg.augment != "none" else x

    def d_losses(self, real: torch.Tensor, r1: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Discriminator loss (+ lazy R1 when ``r1``); returns (loss, real_logits, logs)."""
        cfg = self.cfg
        z = torch.randn(real.shape[0], cfg.gan.z_dim, device=self.device)
        with torch.no_grad():
            fake = self.G.synthesis(self._ws(z), noise_mode="random")
        if r1:  # R1 is taken w.r.t. the un-augmented reals (gradient flows through augment)
            real = real.detach().requires_grad_(True)
        # view_as: D never sees the leaf itself (FlopCounterMode's module hooks reject leaves)
        real_logits = self.D(self._aug(real.view_as(real)))  # (B,)
        fake_logits = self.D(self._aug(fake))
        loss = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
        logs = {"loss_d": loss.item(), "d_real": real_logits.mean().item(),
                "d_fake": fake_logits.mean().item()}
        if r1:
            (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            penalty = grad.square().sum(dim=(1, 2, 3)).mean()
            loss = loss + penalty * (cfg.r1_gamma / 2) * cfg.r1_interval
            logs["r1"] = penalty.item()
        return loss, real_logits, logs

    def g_loss(self, batch: int) -> torch.Tensor:
        z = torch.randn(batch, self.cfg.gan.z_dim, device=self.device)
        fake = self.G.synthesis(self._ws(z), noise_mode="random")
        return F.softplus(-self.D(self._aug(fake))).mean()

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        real = self.reals[self.sampler.next().to(self.device)]
        # --- discriminator
        self.D.requires_grad_(True)
        do_r1 = cfg.r1_gamma > 0 and self.step % cfg.r1_interval == 0
        loss_d, real_logits, logs = self.d_losses(real, do_r1)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        if cfg.augment == "ada":
            self.ada.observe(real_logits)
        # --- generator (D frozen so no D gradients are computed)
        self.D.requires_grad_(False)
        loss_g = self.g_loss(cfg.batch)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        self.nimg += cfg.batch
        self.step += 1
        self._update_ema()
        logs["loss_g"] = loss_g.item()
        if "r1" in logs:
            self.last_r1 = logs.pop("r1")
        return logs

    @torch.no_grad()
    def _update_ema(self) -> None:
        cfg = self.cfg
        ema_nimg = cfg.ema_kimg * 1000
        if cfg.ema_rampup > 0:
            ema_nimg = min(ema_nimg, self.nimg * cfg.ema_rampup)
        beta = 0.5 ** (cfg.batch / max(ema_nimg, 1e-8))
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.copy_(p.lerp(p_ema, beta))
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "medveil-stylegan2/1", "config": self.cfg.to_dict(),
            "step": self.step, "nimg": self.nimg, "last_r1": self.last_r1,
            "G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "ada": self.ada.state_dict(), "sampler": self.sampler.state_dict(),
            "grid_z": self.grid_z, "rng": rng_state(),
        }

    def load_state_dict(self, ck: dict[str, Any], where: str = "checkpoint") -> None:
        config_mismatch(self.cfg.resume_key(), TrainConfig.from_dict(ck["config"]).resume_key(),
                        where)
        self.G.load_state_dict(ck["G"])
        self.D.load_state_dict(ck["D"])
        self.G_ema.load_state_dict(ck["G_ema"])
        self.opt_g.load_state_dict(ck["opt_g"])
        self.opt_d.load_state_dict(ck["opt_d"])
        self.ada.load_state_dict(ck["ada"])
        self.sampler.load_state_dict(ck["sampler"])
        self.grid_z = ck["grid_z"]
        self.step, self.nimg, self.last_r1 = int(ck["step"]), int(ck["nimg"]), ck["last_r1"]
        set_rng_state(ck["rng"])

    def save_checkpoint(self) -> None:
        save_torch_atomic(self.ckpt_path, self.state_dict())

    # ------------------------------------------------------------------ outputs
    def _log(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    @torch.no_grad()
    def write_samples(self) -> Path:
        z = self.grid_z.to(self.device)
        img = torch.cat([self.G_ema(c, noise_mode="const") for c in z.split(16)])
        path = save_grid(img, self.run_dir / "samples" / f"step_{self.step:06d}.png", upscale_to=512)
        save_grid(img, self.run_dir / "samples" / "latest.png", upscale_to=512)
        return path

    def evaluate(self) -> dict[str, Any]:
        with torch.random.fork_rng():  # evaluation must not shift the training RNG stream
            result = dict(self.evaluator(self.G_ema))
        row = {"kind": "eval", "step": self.step, "kimg": self.nimg / 1000, **result}
        self._log(row)
        return row

    def flops_per_image(self) -> float:
        """FLOPs of one D step (R1 amortised over its interval) + one G step, per image."""
        twin = copy.copy(self)  # own copies of the models: this trainer's state is untouched
        twin.G, twin.D = copy.deepcopy(self.G), copy.deepcopy(self.D)
        real = twin.reals[: self.cfg.batch]

        def d_step(r1: bool) -> None:
            twin.D.requires_grad_(True)
            twin.d_losses(real, r1=r1)[0].backward()

        def g_step() -> None:
            twin.D.requires_grad_(False)
            twin.g_loss(self.cfg.batch).backward()

        f_d = count_flops(lambda: d_step(False))
        f_g = count_flops(g_step)
        extra = 0.0
        if self.cfg.r1_gamma > 0:
            extra = (count_flops(lambda: d_step(True)) - f_d) / self.cfg.r1_interval
        return (f_d + f_g + extra) / self.cfg.batch

    # ------------------------------------------------------------------ loop
    def run(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.ckpt_path.exists():
            if not resume:
                raise ConfigError(f"{self.run_dir} already holds a run; pass --resume or "
                                  "choose another output folder")
            self.load_state_dict(load_checkpoint(self.ckpt_path), where=str(self.ckpt_path))
            kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= self.step]
            write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        else:
            self.metrics_path.unlink(missing_ok=True)
        save_train_config(cfg, self.run_dir / "config.toml")

        bar = progress_bar(total=cfg.steps, initial=self.step, desc="gan", unit="step",
                           disable=self.progress is False)
        window: dict[str, float] = {}
        n_window, t_train, n_train, t0 = 0, 0.0, 0, time.perf_counter()
        last_eval: dict[str, Any] = {}
        while self.step < cfg.steps:
            t = time.perf_counter()
            logs = self.train_step()
            t_train += time.perf_counter() - t
            n_train += cfg.batch
            for k, v in logs.items():
                window[k] = window.get(k, 0.0) + v
            n_window += 1
            bar.update(1)
            done = self.step >= cfg.steps
            if self.step % cfg.log_every == 0 or done:
                row = {"kind": "train", "step": self.step, "kimg": self.nimg / 1000,
                       **{k: v / n_window for k, v in window.items()},
                       "r1": self.last_r1, "p": self.ada.p, "r_t": self.ada.r_t,
                       "images_per_s": n_train / max(t_train, 1e-9)}
                self._log(row)
                bar.set_postfix(g=f"{row['loss_g']:.2f}", d=f"{row['loss_d']:.2f}",
                                p=f"{self.ada.p:.2f}")
                window, n_window = {}, 0
            if self.evaluator and ((cfg.eval_every and self.step % cfg.eval_every == 0) or done):
                last_eval = self.evaluate()
            if cfg.sample_every and self.step % cfg.sample_every == 0 and not done:
                self.write_samples()
                self._plot()
            if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or done:
                self.save_checkpoint()
        bar.close()
        self.write_samples()
        ips = n_train / t_train if t_train > 0 else float("nan")
        summary = {"step": self.step, "kimg": self.nimg / 1000, "wall_s": time.perf_counter() - t0,
                   "p": self.ada.p, "device": str(self.device), "config": cfg.to_dict(),
                   "throughput": (throughput_report(ips, self.flops_per_image())
                                  if n_train and self.measure_throughput else {}),
                   "last_eval": last_eval, "last_train": next(
                       (r for r in reversed(read_metrics(self.metrics_path)) if r["kind"] == "train"),
                       {})}
        write_json_atomic(self.run_dir / "summary.json", summary)
        self._plot()
        return summary

    def _plot(self) -> None:
        if self.curves:
            plot_curves(self.metrics_path, self.run_dir / "curves.png")


def train_gan(images: torch.Tensor, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False,
              evaluator: Evaluator | None = None, device: str | None = None,
              progress: bool | None = None, measure_throughput: bool = True,
              curves: bool = True) -> dict[str, Any]:
    """Train (or resume) a StyleGAN2 on ``images`` (N, C, R, R) float in [0, 1].
    Returns the summary dict also written to RUN_DIR/summary.json. ``measure_throughput``:
    count FLOPs of one step and time a matmul at the end (a few seconds). ``curves``: draw
    RUN_DIR/curves.png (matplotlib, ~1 s per drawing)."""
    trainer = GANTrainer(images, cfg, run_dir, evaluator=evaluator, device=device,
                         progress=progress, measure_throughput=measure_throughput, curves=curves)
    return trainer.run(resume=resume)
