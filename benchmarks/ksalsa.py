"""k-SALSA benchmark on APTOS-2019: utility, fidelity and privacy of k-anonymous releases and
their baselines, plus the speed of batched vs per-group style alignment.

    python benchmarks/ksalsa.py --quick                     # < 10 min, tiny GAN trained here
    python benchmarks/ksalsa.py --gan RUN_DIR [--encoder ENC_DIR]   # full protocol, < 90 min
    python benchmarks/ksalsa.py --gan RUN_DIR [--encoder ENC_DIR] --speed-only   # alignment speed only
    python benchmarks/ksalsa.py --gan RUN_DIR [--encoder ENC_DIR] --grouping random --stratify-labels
                                                            # unrelated people per group, one grade each

Protocol (spec ksalsa.md): APTOS train (3662) is cut once (seed 0, stratified by grade,
identical / re-encoded duplicate photographs kept on one side: medveil.data.duplicates) into
3000 private images to anonymise and 662 real test images (medveil.data.splits: whole duplicate
groups moved until the sizes are met) - the same call as benchmarks/gan_inversion.py, so a
GAN/encoder trained there saw the private part only. (Before 2026-12-01 the grouped split took
one of 6 folds: 3051 / 611; results of that split say so in their JSON "data".) The
private set and the test set are each anonymised (k in {2, 5, 10}); every candidate training
set (k-SALSA, centroid G(w_bar), k-Same-Pixel, GAN reconstructions of N/k real, N/k real) is
scored for utility (same small CNN, tested on the real test images, several seeds), fidelity
(FID/KID vs the private images in the feature net's space) and privacy (linkage attack trained
on the private release, tested on the test release: top-k precision vs chance; NN re-id).
Every release must pass verify-release (medveil.anonymize.verify) before it is evaluated.

--quick: 150 private / 75 test images, a 32 px GAN trained here for 60 steps (or --gan),
10 projector + 10 alignment steps: a smoke run of the whole protocol, not a measurement of
k-SALSA's quality. Full mode defaults (2 CPU cores, 90 min): encoder-only inversion when an
encoder is given (else 10 projector steps) and 25 alignment steps; see the JSON "config".
With so few alignment steps the learning rate is 0.03, not 0.1: our W+ codes spread ~0.2 per
coordinate between images, and on the quick GAN 10 steps at lr 0.1 raised the mean alignment
loss by 26% (2 of 12 groups improved) while lr 0.03 lowered it by 30% (12 of 12).

Grouping (--grouping, --stratify-labels; the same for the private and the test set): the
reference groups similar people (greedy farthest-point on the W+ codes), which is what the
linkage attack exploits; ``--grouping random --stratify-labels`` groups unrelated people of one
grade (exact labels). The JSON is rewritten after every k ("complete": false until the end).

Sweeps: --group-seed (another draw of the grouping); of the alignment: --lambda-s (style
weight), --steps, --content-net trained (content embedding from a ConvFeatureNet trained here
on the private grades; style, FID/KID and the linkage attack stay in --feature-net's space);
--sets k-SALSA --no-reference evaluates the release alone. Every linkage row also gives the
label-aware chance (medveil.evaluate.linkage).

Images stay under --work (git-ignored runs/ or /tmp); only numbers go into the JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medveil.anonymize.alignment import (
    AlignConfig,
    align_groups,
)
from medveil.anonymize.grouping import METHODS
from medveil.anonymize.pipeline import AnonymizeConfig, PrivateSet, anonymize, to_uint8
from medveil.anonymize.quick import load_models, quick_models
from medveil.anonymize.verify import verify_release
from medveil.data import load_dataset, to_tensor
from medveil.data.duplicates import duplicate_groups
from medveil.data.splits import split_indices
from medveil.evaluate.release_eval import SET_NAMES, baseline_sets, evaluate_sets, format_table
from medveil.evaluate.utility import UtilityConfig, utility_scores
from medveil.generative.feature_training import FeatureTrainConfig, train_feature_net
from medveil.io import write_json_atomic
from medveil.models.features import build_feature_net

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alignment_reference import align_per_group_reference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = 662


def aptos_sets(data_root: Path, work: Path, resolution: int, seed: int = 0
               ) -> tuple[PrivateSet, PrivateSet]:
    """Private / test APTOS sets at ``resolution`` (cached as uint8 under ``work``).

    APTOS has no patient ids, but it holds the same photograph under several ids: the
    duplicate group of each image (found at full resolution) is its subject id, so a group of
    k holds k distinct photographs and the copies of one photograph stay in one group."""
    cache = work / f"aptos_{resolution}px_seed{seed}_test{HELD_OUT}.npz"  # older caches: 3051/611
    if cache.is_file():
        with np.load(cache) as f:
            arrays = {k: f[k] for k in f.files}
    else:
        ds = load_dataset(data_root / "aptos2019")
        split = ds.split("train")
        images = split.images  # uint8 (3662, 224, 224, 3)
        dups = duplicate_groups(images)
        parts = split_indices(split.labels, val=0.0, test=HELD_OUT / len(split), groups=dups,
                              seed=seed)
        small = to_uint8(to_tensor(images, size=resolution, channels=3))
        arrays = {f"{p}_{what}": arr[parts[name]] for p, name in (("private", "train"),
                                                                    ("test", "test"))
                  for what, arr in (("images", small), ("labels", split.labels),
                                    ("ids", np.asarray(split.ids).astype(str)),
                                    ("subjects", np.char.add("photo-", dups.astype(str))))}
        arrays["class_names"] = np.asarray(ds.class_names)
        work.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **arrays)
    names = [str(c) for c in arrays["class_names"]]
    return tuple(PrivateSet(arrays[f"{p}_images"], arrays[f"{p}_labels"].astype(np.int64),
                            [str(i) for i in arrays[f"{p}_ids"]], names,
                            patient_ids=arrays[f"{p}_subjects"], source=f"APTOS {p}")
                 for p in ("private", "test"))  # type: ignore[return-value]


def subsample(data: PrivateSet, n: int | None, seed: int) -> PrivateSet:
    if n is None or n >= len(data.ids):
        return data
    idx = np.sort(np.random.default_rng(seed).choice(len(data.ids), n, replace=False))
    return PrivateSet(data.images[idx], data.labels[idx], [data.ids[i] for i in idx],
                      data.class_names, data.patient_ids[idx], f"{data.source} (random {n})")


def content_net_spec(spec: str | None, private: PrivateSet, work: Path) -> str | None:
    """``trained`` -> ``conv:FILE`` of a ConvFeatureNet trained (supervised, default
    FeatureTrainConfig, seed 0) on the private images and grades; anything else unchanged."""
    if spec != "trained":
        return spec
    path = work / f"content-net-{private.images.shape[1]}px.pt"
    if not path.is_file():
        print(f"training the content net on {len(private.ids)} private images -> {path}", flush=True)
        train_feature_net(to_tensor(private.images), torch.from_numpy(private.labels), path,
                          FeatureTrainConfig(), progress=False)
    return f"conv:{path}"


def speed_comparison(result, models, net, feature_spec: str, cfg: AlignConfig, n_batch: int,
                     n_ref: int) -> dict[str, Any]:
    """Batched alignment (one batch of ``n_batch`` groups, as the pipeline runs it) vs the
    per-group reference loop (first ``n_ref`` of those groups: its groups/s does not depend on
    how many it does), same steps; latents compared on the common groups."""
    G = models.G
    groups = result.groups[:n_batch]
    x = to_tensor(result.reals, channels=G.img_channels)
    recons = to_tensor(result.recons, channels=G.img_channels)
    ws = torch.from_numpy(result.ws)
    w0 = torch.stack([ws[torch.as_tensor(g)].mean(0) for g in groups])
    batched = align_groups(G, w0, x, recons, groups, net, cfg=cfg, batch_size=len(groups),
                           progress=False)
    n_ref = min(n_ref, len(groups))
    reference = align_per_group_reference(G, w0[:n_ref], x, recons, groups[:n_ref], feature_spec,
                                          cfg=cfg, progress=False)
    b, r = len(groups) / batched.seconds, n_ref / reference.seconds
    return {"groups": len(groups), "reference_groups": n_ref, "steps": cfg.steps,
            "batched_groups_per_s": b, "reference_groups_per_s": r, "speedup": b / r,
            "batched_layout": "channels_last, one batch of all groups",
            "max_abs_latent_diff": float((batched.ws[:n_ref] - reference.ws).abs().max()),
            "batched_s": batched.seconds, "reference_s": reference.seconds}


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def timed_speed(P, models, net, args: argparse.Namespace, align: AlignConfig, k: int) -> dict[str, Any]:
    speed = speed_comparison(P, models, net, args.feature_net, align,
                             n_batch=16 if args.quick else 64, n_ref=8 if args.quick else 16)
    print(f"alignment speed k={k} ({speed['groups']} / {speed['reference_groups']} groups, "
          f"{align.steps} steps): batched {speed['batched_groups_per_s']:.3f} groups/s, per-group "
          f"reference {speed['reference_groups_per_s']:.3f} groups/s, ratio {speed['speedup']:.1f}x "
          f"(max |latent diff| {speed['max_abs_latent_diff']:.1e})", flush=True)
    return speed


def speed_only(args: argparse.Namespace, private, models, net, align: AlignConfig,
               invert_steps: int, work: Path, t_start: float) -> int:
    """Groups, reconstructions and centroids from a release with 0 alignment steps, then the
    timing of both alignment paths at the configured steps."""
    results = {}
    for k in [int(v) for v in args.ks.split(",")]:
        cfg = AnonymizeConfig(k=k, feature_net=args.feature_net, align=replace(align, steps=0),
                              invert_steps=invert_steps)
        P = anonymize(private, models, work / f"k{k}" / "speed", cfg, overwrite=True,
                      progress=False, inversion_dir=work / "inversion-private")
        results[f"k={k}"] = {"speed": timed_speed(P, models, net, args, align, k)}
    payload = {"benchmark": "ksalsa-speed", "quick": args.quick, "command": " ".join(sys.argv),
               "machine": machine(), "n_private": len(private.ids), "align": align.to_dict(), "models": models.info,
               "feature_net": net.describe(), "results": results,
               "wall_s": time.perf_counter() - t_start}
    out = args.out or REPO / "benchmarks" / "results" / f"ksalsa{'_quick' if args.quick else ''}_speed.json"
    write_json_atomic(out, payload)
    print(f"\nwrote {out} ({payload['wall_s'] / 60:.1f} min)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (< 10 min)")
    p.add_argument("--gan", type=Path, help="trained GAN run (private APTOS part only)")
    p.add_argument("--encoder", type=Path, help="trained encoder for --gan")
    p.add_argument("--data-root", type=Path, default=Path(os.environ.get(
        "MEDVEIL_SHARED_DATA", REPO.parent / "shared" / "data")))
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench_ksalsa")
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/)")
    p.add_argument("--ks", default="2,5,10")
    p.add_argument("--feature-net", default="random-conv:seed=0",
                   help="alignment net and evaluation space (FID/KID, linkage)")
    p.add_argument("--content-net", default=None,
                   help="content net of the alignment only (style and evaluation stay on "
                        "--feature-net); 'trained': a ConvFeatureNet trained here on the private "
                        "images and grades (cached under --work); not used by --speed-only")
    p.add_argument("--n-private", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="alignment steps")
    p.add_argument("--lr", type=float, default=None, help="alignment lr (0.03 below 50 steps)")
    p.add_argument("--lambda-s", type=float, default=None,
                   help="style weight of the alignment (default: AlignConfig's)")
    p.add_argument("--sets", default=",".join(SET_NAMES),
                   help="comma-separated sets to evaluate (default: all; e.g. k-SALSA for a sweep)")
    p.add_argument("--invert-steps", type=int, default=None)
    p.add_argument("--gan-steps", type=int, default=60, help="quick GAN steps without --gan")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grouping", default="greedy", choices=METHODS,
                   help="grouping of both the private and the test set (greedy: the reference)")
    p.add_argument("--group-seed", type=int, default=0,
                   help="seed of the grouping (ties; the random partition)")
    p.add_argument("--stratify-labels", action="store_true",
                   help="group each grade on its own (label-pure groups)")
    p.add_argument("--no-speed", action="store_true", help="skip the alignment timing")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the all-real reference classifier (for sweeps)")
    p.add_argument("--speed-only", action="store_true",
                   help="only the batched vs per-group alignment timing (groups from an unaligned "
                        "release); writes ksalsa[_quick]_speed.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if not (args.data_root / "aptos2019" / "train.csv").is_file():
        print(f"APTOS not found under {args.data_root} (set MEDVEIL_SHARED_DATA)", file=sys.stderr)
        return 2
    q = args.quick
    n_private = args.n_private or (150 if q else None)
    n_test = args.n_test or (75 if q else None)
    steps = args.steps if args.steps is not None else 10 if q else 25
    lr = args.lr or (0.03 if steps < 50 else 0.1)
    align = AlignConfig(steps=steps, lr=lr)
    if args.lambda_s is not None:
        align = replace(align, lambda_s=args.lambda_s)
    wanted = [name.strip() for name in args.sets.split(",")]
    if unknown := sorted(set(wanted) - set(SET_NAMES)):
        print(f"--sets: unknown {unknown}; choose from {list(SET_NAMES)}", file=sys.stderr)
        return 2
    invert_steps = (args.invert_steps if args.invert_steps is not None
                    else 10 if q or args.encoder is None else 0)
    utility = UtilityConfig(epochs=10 if q else 30, seeds=(0, 1) if q else (0, 1, 2))
    work = args.work / ("quick" if q else "full")

    if args.gan is not None:
        models = load_models(args.gan, args.encoder)
        resolution = models.G.resolution
        private, test = aptos_sets(args.data_root, args.work, resolution)
    else:
        if not q:
            print("full mode needs --gan RUN_DIR (train one with benchmarks/gan.py)",
                  file=sys.stderr)
            return 2
        private, test = aptos_sets(args.data_root, args.work, 32)
        private = subsample(private, n_private, seed=1)
        models = quick_models(to_tensor(private.images), work / "quick-models",
                              gan_steps=args.gan_steps, encoder_steps=0, progress=False)
        resolution = 32
    private, test = subsample(private, n_private, seed=1), subsample(test, n_test, seed=2)
    print(f"APTOS: {len(private.ids)} private / {len(test.ids)} test images at {resolution} px; "
          f"models {models.info.get('gan')}", flush=True)

    net = build_feature_net(args.feature_net)
    n_cls = len(private.class_names)
    results: dict[str, Any] = {}
    first = None
    if args.speed_only:
        return speed_only(args, private, models, net, align, invert_steps, work, t_start)
    out = args.out or REPO / "benchmarks" / "results" / f"ksalsa{'_quick' if q else ''}.json"

    content = content_net_spec(args.content_net, private, work)

    def payload(reference: dict[str, Any] | None, complete: bool) -> dict[str, Any]:
        return {
            "benchmark": "ksalsa", "quick": q, "command": " ".join(sys.argv),
            "complete": complete, "machine": machine(),
            "data": {"dataset": "APTOS-2019 train", "n_private": len(private.ids),
                     "n_test": len(test.ids), "resolution": resolution, "split_seed": 0,
                     "duplicates": "identical/near-identical photographs kept on one side of the "
                                   "split and used as subject ids (grouped together)"},
            "config": {"ks": args.ks, "grouping": args.grouping, "group_seed": args.group_seed,
                       "stratify_labels": args.stratify_labels, "align_steps": steps,
                       "sets": wanted, "content_net": content,
                       "invert_steps": invert_steps, "encoder": models.encoder is not None,
                       "align": align.to_dict(), "utility": utility.to_dict()},
            "models": models.info, "feature_net": net.describe(), "results": results,
            "reference_all_real": reference, "wall_s": time.perf_counter() - t_start,
        }

    for k in [int(v) for v in args.ks.split(",")]:
        cfg = AnonymizeConfig(k=k, grouping=args.grouping, stratify_labels=args.stratify_labels,
                              feature_net=content or args.feature_net,
                              style_net=args.feature_net if content else None, align=align,
                              invert_steps=invert_steps, seed=args.group_seed)
        t0 = time.perf_counter()
        out_dirs = {part: work / f"k{k}" / part for part in ("private", "test")}
        P = anonymize(private, models, out_dirs["private"], cfg, overwrite=True,
                      progress=False, inversion_dir=work / "inversion-private")
        T = anonymize(test, models, out_dirs["test"], cfg, overwrite=True,
                      progress=False, inversion_dir=work / "inversion-test")
        t_anon = time.perf_counter() - t0
        verdicts = {part: verify_release(d, k).passed for part, d in out_dirs.items()}
        if not all(verdicts.values()):
            raise SystemExit(f"k={k}: verify-release fails on the benchmark's own release "
                             f"{verdicts}; see medveil verify-release {out_dirs['private']} --k {k}")
        first = first or P
        sets_p, sets_t = ({n: s for n, s in baseline_sets(
            R.groups, data.labels, n_cls, R.reals, ksalsa=R.images, centroids=R.centroid_images,
            recons=R.recons).items() if n in wanted} for R, data in ((P, private), (T, test)))
        t0 = time.perf_counter()
        table = evaluate_sets(sets_p, P.reals, T.reals, test.labels, n_cls, k, net,
                              heldout_sets=sets_t, utility=utility, progress=False)
        print(format_table(table, f"\nk={k} ({args.grouping} grouping"
                                  f"{' within grades' if args.stratify_labels else ''}): "
                                  f"{len(P.groups)} private groups, {len(T.groups)} test groups"),
              flush=True)
        speed = None if args.no_speed else timed_speed(P, models, net, args, align, k)
        results[f"k={k}"] = {"sets": table, "anonymize_s": t_anon, "speed": speed,
                             "verify_release_passed": verdicts,
                             "evaluate_s": time.perf_counter() - t0,
                             "private_report_timings": P.report["timings"],
                             "alignment_losses": P.report["alignment_losses"]}
        write_json_atomic(out, payload(None, complete=False))  # partial, after every k
    reference = None
    if not args.no_reference:
        test_reals = to_uint8(to_tensor(test.images, size=resolution, channels=3))
        reference = utility_scores({"all real (N)": (first.reals, private.labels)}, test_reals,
                                   test.labels, n_cls, utility, progress=False)
        all_real = reference["all real (N)"]
        print(f"\nreference: all {len(private.ids)} real private images -> acc "
              f"{all_real['acc_mean']:.3f}, qwk {all_real['qwk_mean']:.3f}")
    final = payload(reference, complete=True)
    write_json_atomic(out, final)
    print(f"\nwrote {out} ({final['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
