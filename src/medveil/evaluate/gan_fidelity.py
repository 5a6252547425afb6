"""FID/KID of a generator during or after training, against held-out real images.

:class:`GANFidelity` is the ``evaluator`` that :func:`medveil.generative.train.train_gan`
calls with the EMA generator: it draws ``n_fake`` images from fixed latents (same seeds at every
evaluation, so curves compare like with like) and scores them with
:func:`medveil.evaluate.fidelity.fidelity_metrics` in the embedding space of a documented
feature net (no Inception weights here: values are comparable only for the same feature net).
"""

from __future__ import annotations

from typing import Any

import torch

from medveil.errors import DataError
from medveil.evaluate.fidelity import fidelity_metrics
from medveil.models.features import FeatureNet, build_feature_net
from medveil.models.stylegan2 import Generator

DEFAULT_FEATURE_NET = "random-conv:seed=0"


@torch.no_grad()
def generate_images(G: Generator, n: int, seed: int = 0, batch: int = 64,
                    truncation_psi: float = 1.0, noise_mode: str = "const") -> torch.Tensor:
    """n images from fixed latents -> float (n, C, R, R) in [0, 1] on the CPU."""
    device = next(G.parameters()).device
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed))
    out = [G(c.to(device), truncation_psi, noise_mode).cpu() for c in z.split(batch)]
    return torch.cat(out).add(1).div(2).clamp(0, 1)


class GANFidelity:
    """Evaluator: G -> {"fid", "kid_mean", "kid_std", ..., "feature_net"}.

    real: held-out real images (N, C, R, R) float in [0, 1], never the training split.
    """

    def __init__(self, real: torch.Tensor, feature_net: str | FeatureNet = DEFAULT_FEATURE_NET,
                 n_fake: int = 500, seed: int = 0, kid_subsets: int = 50) -> None:
        if real.ndim != 4 or real.shape[0] < 2:
            raise DataError(f"held-out real set must be (N>=2, C, H, W), got {tuple(real.shape)}")
        self.real = real.float()
        self.net = build_feature_net(feature_net) if isinstance(feature_net, str) else feature_net
        self.spec = feature_net if isinstance(feature_net, str) else getattr(feature_net, "name", "?")
        self.n_fake, self.seed, self.kid_subsets = n_fake, seed, kid_subsets

    def __call__(self, G: Generator) -> dict[str, Any]:
        if tuple(self.real.shape[2:]) != (G.resolution, G.resolution):
            raise DataError(f"held-out images are {tuple(self.real.shape[2:])}, generator makes "
                            f"{G.resolution}x{G.resolution}")
        fake = generate_images(G, self.n_fake, seed=self.seed)
        m = fidelity_metrics(self.real, fake, self.net, kid_subsets=self.kid_subsets, seed=self.seed)
        m.pop("nn_real_distance", None)  # per-image list: too long for metrics rows
        m["feature_net_spec"] = self.spec
        return m
