"""The anonymisation step of ``medveil demo``: a small k = 5 release of the shipped RetinaMNIST
sample with the GAN demo's tiny 32 px generator, checked by :func:`verify_release`.

Minutes on 2 CPU cores: the generator is the GAN demo's run when its folder is given (else it
is trained here with :func:`medveil.generative.demo.train_tiny`), only the first
``DEMO_IMAGES`` images of the train split are released, inversion is the projector alone (no
encoder) with few steps, and alignment runs fewer steps than the default 100.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medveil.anonymize.alignment import AlignConfig
from medveil.anonymize.pipeline import (
    AnonymizeConfig, Models, PrivateSet, anonymize, private_set,
)
from medveil.anonymize.verify import verify_release
from medveil.data.loading import load_dataset
from medveil.generative.checkpoint import load_generator
from medveil.generative.demo import default_retina_path, train_tiny
from medveil.generative.encoder_training import generator_fingerprint

DEMO_K = 5
DEMO_IMAGES = 100
DEMO_ALIGN_STEPS = 20
DEMO_INVERT_STEPS = 10
DEMO_GAN_STEPS = 300


def run(out_dir: str | Path, gan_dir: str | Path | None = None, *, k: int = DEMO_K,
        n_images: int = DEMO_IMAGES, align_steps: int = DEMO_ALIGN_STEPS,
        invert_steps: int = DEMO_INVERT_STEPS, gan_steps: int = DEMO_GAN_STEPS,
        progress: bool | None = None) -> dict[str, Any]:
    """Write a k-anonymous release of the RetinaMNIST sample's train split to ``out_dir``
    (release/, audit/, report.json: :mod:`medveil.anonymize.release`), verify it, print the
    verdict and return a JSON-ready summary. gan_dir: the GAN demo's run folder (or a
    checkpoint); without it a tiny GAN is trained into ``<out_dir>-gan``."""
    out = Path(out_dir)
    data_path = default_retina_path()
    gan = Path(gan_dir) if gan_dir is not None else out.with_name(out.name + "-gan")
    if not (gan / "checkpoints" / "latest.pt").is_file() and not gan.is_file():
        print(f"medveil: training the tiny demo generator ({gan_steps} steps) in {gan}", flush=True)
        train_tiny(data_path, gan, steps=gan_steps, resume=True, progress=progress)
    G = load_generator(gan)
    models = Models(G, None, {"gan": str(gan), "gan_config": G.cfg.to_dict(),
                              "generator_sha256": generator_fingerprint(G),
                              "note": "tiny demo generator: a demonstration, not a usable release"})
    full = private_set(load_dataset(data_path), "train")
    n = min(n_images, len(full.ids))
    data = PrivateSet(full.images[:n], full.labels[:n], full.ids[:n], full.class_names,
                      source=f"{full.source} (first {n})")
    cfg = AnonymizeConfig(k=k, align=AlignConfig(steps=align_steps), invert_steps=invert_steps)
    with torch.random.fork_rng(devices=[]):
        result = anonymize(data, models, out, cfg, overwrite=True, progress=progress)
    verdict = verify_release(out)
    print(verdict.table())
    print(f"medveil: {out / 'audit'} links images to people: keep it apart from "
          f"{out / 'release'}")
    rep = result.report
    return {"out": str(out), "dataset": str(data_path), "k": rep["k"],
            "n_images": rep["n_images"], "n_members": rep["n_members"],
            "verify_passed": verdict.passed, "checks": [vars(c) for c in verdict.checks],
            "alignment_losses": rep["alignment_losses"], "timings": rep["timings"]}
