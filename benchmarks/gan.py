"""GAN benchmark on APTOS-2019 at 64 px: training speed and fidelity over training.

    .venv/bin/python benchmarks/gan.py --quick --threads 1   # smoke run, no inversion
    .venv/bin/python benchmarks/gan.py --threads 2           # full: 2000 steps + encoder + inversion (~45 min)
    .venv/bin/python benchmarks/gan.py --steps 3000          # longer (resumes from the run folder)

APTOS is cut once (seed 0; duplicate photographs kept on one side; stratified by grade) into a
private set (3000 images) that the generator trains on and a held-out set (662 real images,
never trained on) that FID/KID are measured against - the same cut as
``benchmarks/gan_inversion.py`` (:func:`aptos_split`). Reports images/s, the fraction of the
measured fp32 matmul peak (FLOPs of one step counted by torch's FlopCounterMode), FID and KID
(in the embedding space of ``--feature-net``; not Inception, so not comparable with published
numbers) at every evaluation, and writes sample grids + curves under ``--work`` (git-ignored
runs/; no APTOS image ever goes into the repository) and numbers to benchmarks/results/gan.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gan_inversion import aptos_split  # noqa: E402  (same private / held-out cut)

from medveil.evaluate.gan_fidelity import GANFidelity  # noqa: E402
from medveil.generative.demo import small64_config  # noqa: E402
from medveil.generative.figures import read_metrics  # noqa: E402
from medveil.generative.train import train_gan  # noqa: E402
from medveil.io import write_json_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_gan_benchmark(data_root: Path, work: Path, *, quick: bool, steps: int, eval_every: int,
                      eval_images: int, feature_net: str, seed: int = 0) -> dict[str, Any]:
    data = aptos_split(data_root, resolution=64, seed=seed)
    private, held_out = data["private"], data["held_out"]
    cfg = small64_config(steps=steps, seed=seed)
    cfg = dataclasses.replace(cfg, eval_every=eval_every, eval_images=eval_images,
                              sample_every=min(cfg.sample_every, eval_every or steps))
    evaluator = GANFidelity(held_out, feature_net, n_fake=eval_images, seed=seed)
    t0 = time.perf_counter()
    summary = train_gan(private, cfg, work, resume=True, evaluator=evaluator)
    rows = read_metrics(work / "metrics.jsonl")
    evals = [{k: r[k] for k in ("step", "kimg", "fid", "kid_mean", "kid_std")} for r in rows
             if r["kind"] == "eval"]
    last = summary["last_train"]
    return {
        "quick": quick, "run_dir": str(work), "n_private": len(private), "n_held_out": len(held_out),
        "split": "aptos2019 train.csv, seed 0, duplicates grouped, 662 held out (gan_inversion.aptos_split)",
        "config": cfg.to_dict(), "steps": summary["step"], "kimg": summary["kimg"],
        "wall_s_this_call": time.perf_counter() - t0, "throughput": summary["throughput"],
        "final_losses": {"loss_g": last.get("loss_g"), "loss_d": last.get("loss_d"),
                         "d_real": last.get("d_real"), "d_fake": last.get("d_fake")},
        "ada_p": summary["p"], "fidelity_over_training": evals,
        "feature_net": rows[-1].get("feature_net_info") if rows and rows[-1]["kind"] == "eval" else None,
        "sample_grid": str(work / "samples" / "latest.png"), "curves": str(work / "curves.png"),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
    }


def print_table(r: dict[str, Any]) -> None:
    tp = r["throughput"]
    print(f"APTOS 64 px StyleGAN2: {r['n_private']} private images, {r['steps']} steps "
          f"({r['kimg']:.1f} kimg), ADA p {r['ada_p']:.3f}")
    if tp:
        print(f"throughput: {tp['images_per_s']:.1f} images/s, {tp['flops_per_image'] / 1e9:.2f} GFLOP/image, "
              f"{tp['achieved_flops'] / 1e9:.1f} GFLOP/s = {100 * tp['fraction_of_peak']:.1f}% of "
              f"measured fp32 matmul peak {tp['matmul_peak_flops'] / 1e9:.1f} GFLOP/s "
              f"({tp['threads']} threads)")
    name = (r["feature_net"] or {}).get("name", "?")
    print(f"{'step':>6s} {'kimg':>6s} {'FID':>9s} {'KID x1e3':>12s}   (vs {r['n_held_out']} held-out real, {name})")
    for e in r["fidelity_over_training"]:
        print(f"{e['step']:6d} {e['kimg']:6.1f} {e['fid']:9.3f} {1e3 * e['kid_mean']:7.3f} +- {1e3 * e['kid_std']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="120 steps, evaluations every 40 on 300 images, no inversion (< 10 min)")
    parser.add_argument("--steps", type=int, default=2000,
                        help="generator steps of batch 16 (default 2000: ~25 min at 2 threads, ~21 img/s)")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-images", type=int, default=500)
    parser.add_argument("--feature-net", default="random-conv:seed=0")
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get(
        "MEDVEIL_SHARED_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--work", type=Path, default=None, help="run folder (default runs/bench_gan[_quick])")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is much faster when other jobs share the cores)")
    parser.add_argument("--inversion", action=argparse.BooleanOptionalAction, default=None,
                        help="also train an encoder and measure inversion (benchmarks/gan_inversion.py) "
                             "on this generator (default: on, off with --quick)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gan.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.data_root / "aptos2019").is_dir():
        raise SystemExit(f"APTOS not found under {args.data_root} (set MEDVEIL_SHARED_DATA)")
    steps, eval_every, eval_images = args.steps, args.eval_every, args.eval_images
    if args.quick:
        steps, eval_every, eval_images = min(steps, 120), min(eval_every, 40), min(eval_images, 300)
    inversion = (not args.quick) if args.inversion is None else args.inversion
    work = args.work or REPO / "runs" / ("bench_gan_quick" if args.quick else "bench_gan")
    result = {"training": run_gan_benchmark(args.data_root, work, quick=args.quick, steps=steps,
                                            eval_every=eval_every, eval_images=eval_images,
                                            feature_net=args.feature_net),
              "inversion": None}
    print_table(result["training"])
    if inversion:  # hook: the inversion half lives in gan_inversion.py
        from gan_inversion import print_table as print_inversion
        from gan_inversion import run_inversion_benchmark

        result["inversion"] = run_inversion_benchmark(args.data_root, work.parent / (work.name + "_inversion"),
                                                      gan=work, quick=args.quick,
                                                      feature_net=args.feature_net)
        print_inversion(result["inversion"])
    result["command"] = " ".join([".venv/bin/python", "benchmarks/gan.py", *sys.argv[1:]])
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}; samples {result['training']['sample_grid']}")


if __name__ == "__main__":
    main()
