"""``medveil anonymize`` (make a k-anonymous synthetic release) and ``medveil evaluate-release``
(its utility, fidelity and privacy). ``medveil verify-release`` lives in anonymize_cmd."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medveil.errors import ConfigError

GROUPINGS = ("greedy", "mdav", "random")  # = anonymize.grouping.METHODS (not imported: CLI start-up)

FEATURE_NET_HELP = ("feature network: random-conv:seed=0 (default; fixed random VGG-like conv "
                    "net), conv:FILE.pt (conv net trained on the data or supplied), "
                    "vit:CKPT.pt (a MedVeil ViT, e.g. the federated backbone)")


def _add_data_args(p: argparse.ArgumentParser, prefix: str = "", required: bool = True) -> None:
    """--images/--labels or --data, plus the column options, for one image set."""
    dash = f"--{prefix}-" if prefix else "--"
    what = f"{prefix} " if prefix else ""
    p.add_argument(f"{dash}images", type=Path, metavar="DIR",
                   help=f"folder of the {what}images (with {dash}labels); relative to the current "
                        "folder, like every path on the command line (file names inside the CSV "
                        "are relative to this folder)")
    p.add_argument(f"{dash}labels", type=Path, metavar="CSV",
                   help=f"CSV with one row per {what}image: id, label [, patient]")
    p.add_argument(f"{dash}data", type=Path, metavar="PATH",
                   help=f"instead of {dash}images/{dash}labels: any dataset MedVeil reads "
                        "(a MedMNIST .npz, a folder with a CSV, DICOM)")
    p.add_argument(f"{dash}split", default=None,
                   help="split of the dataset to use (default: train for the private set, "
                        "test for the test set)")


def _add_column_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id-column", help="CSV column with the image id / file name")
    p.add_argument("--label-column", help="CSV column with the class label")
    p.add_argument("--patient-column",
                   help="CSV column with the patient id: groups then hold >= k distinct "
                        "patients and no patient is split across groups")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "anonymize",
        help="make a k-anonymous synthetic release (k-SALSA): one image per group of k people",
        description=(
            "Invert every private image into a StyleGAN2's W+ space, group the latents into "
            "groups of k..2k-1 people, and synthesise one image per group from the group "
            "centroid with local style alignment. Writes OUT/release (images + labels.csv: "
            "share this), OUT/audit/groups.csv (which people each image was made from: keep it "
            "apart, never share it) and OUT/report.json. A killed run resumes from OUT/.work "
            "when started again with the same arguments."),
    )
    _add_data_args(p)
    _add_column_args(p)
    p.add_argument("--k", type=int, required=True, help="people per released image (>= 2)")
    p.add_argument("--out", type=Path, required=True, metavar="OUT", help="output folder")
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--gan", type=Path, metavar="RUN_DIR",
                        help="trained StyleGAN2 run (medveil gan train) or checkpoint file")
    models.add_argument("--quick", action="store_true",
                        help="train a tiny GAN + encoder on the images first (a few minutes; "
                             "a smoke run, not a usable release)")
    p.add_argument("--encoder", type=Path, metavar="ENC_DIR",
                   help="trained ReStyle encoder for --gan (without it: projector only)")
    p.add_argument("--grouping", choices=GROUPINGS, default="greedy",
                   help="greedy farthest-point (k-SALSA reference, corrected), MDAV (both group "
                        "similar people), or a seeded random partition (unrelated people: "
                        "much harder to link, lower fidelity; see the README)")
    p.add_argument("--stratify-labels", action="store_true",
                   help="group each label class on its own, so every released image's label "
                        "is exact (classes with fewer than k people are pooled)")
    p.add_argument("--feature-net", default="random-conv:seed=0", metavar="SPEC",
                   help=FEATURE_NET_HELP + "; used for the content loss and the inversion")
    p.add_argument("--style-net", default=None, metavar="SPEC",
                   help="feature network for the style (Gram) loss (default: --feature-net)")
    p.add_argument("--steps", type=int, default=100, help="alignment steps per group (100)")
    p.add_argument("--lr", type=float, default=0.1,
                   help="alignment Adam learning rate (0.1, for 100 steps; with far fewer "
                        "steps a smaller rate, e.g. 0.03, avoids overshooting)")
    p.add_argument("--invert-steps", type=int, default=100,
                   help="projector steps per image after the encoder (100; 0 = encoder only)")
    p.add_argument("--lambda-c", type=float, default=None, help="content weight (1e2)")
    p.add_argument("--lambda-s", type=float, default=None,
                   help="style weight (0.05 for mean Grams; the reference's 1e-6 is for "
                        "--gram-scale sum with VGG-19 at 512 px)")
    p.add_argument("--gram-scale", choices=("mean", "sum"), default="mean",
                   help="Gram per patch divided by its positions (mean) or not (sum)")
    p.add_argument("--patches", type=int, default=4, help="P: P x P patch grid (4)")
    p.add_argument("--batch-groups", type=int, default=64,
                   help="groups optimised together in one batch (64)")
    p.add_argument("--seed", type=int, default=0, help="seed (grouping ties, random grouping, quick models)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a complete release already in OUT")
    p.add_argument("--quick-gan-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--quick-encoder-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_anonymize)

    e = subparsers.add_parser(
        "evaluate-release",
        help="utility, fidelity and privacy of a release (and k-Same-Pixel / N/k-real baselines)",
        description=(
            "Score a release OUT written by `medveil anonymize`. Utility: the same small CNN "
            "is trained on the released images (majority labels) and on the baselines, and "
            "tested on real held-out images (accuracy, quadratic-weighted kappa; several seeds, "
            "fixed epochs, no model selection on the test set). Fidelity: FID/KID and "
            "nearest-real distance vs the private images in the feature net's space. Privacy "
            "(with --test-release: the held-out images anonymised separately): a linkage "
            "attack trained on OUT's audit and tested on the held-out release (top-k "
            "precision vs chance k/N) and nearest-neighbour re-identification. Needs OUT/audit."),
    )
    e.add_argument("out", type=Path, metavar="OUT", help="release folder (release/, audit/)")
    _add_data_args(e)
    _add_data_args(e, prefix="test")
    _add_column_args(e)
    e.add_argument("--test-release", type=Path, metavar="OUT2",
                   help="release of the held-out images, made separately (enables the linkage "
                        "attack)")
    e.add_argument("--feature-net", default="random-conv:seed=0", metavar="SPEC",
                   help=FEATURE_NET_HELP + "; for FID/KID and the attack features")
    e.add_argument("--epochs", type=int, default=30, help="classifier epochs (30)")
    e.add_argument("--seeds", type=int, default=3, help="classifier seeds (3)")
    e.add_argument("--json", type=Path, metavar="FILE",
                   help="write the results as JSON to FILE (keep it outside release/)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=run_evaluate)


def load_images_arg(args: argparse.Namespace, prefix: str = "", default_split: str = "train"):
    """The PrivateSet named by --images/--labels or --data (with prefix, e.g. --test-data)."""
    from medveil.anonymize.pipeline import private_set
    from medveil.data.loading import load_dataset

    pre = f"{prefix}_" if prefix else ""
    dash = f"--{prefix}-" if prefix else "--"
    images, labels, data = (getattr(args, f"{pre}{n}") for n in ("images", "labels", "data"))
    cols = {"id_column": args.id_column, "label_column": args.label_column,
            "patient_column": args.patient_column}
    if data is not None and (images is not None or labels is not None):
        raise ConfigError(f"give either {dash}data or {dash}images/{dash}labels, not both")
    if data is not None:
        is_npz = Path(data).suffix.lower() == ".npz"
        dataset = load_dataset(data, **({} if is_npz else cols))
    elif labels is not None:  # a command-line path is the current folder's, not the CSV's
        dataset = load_dataset(labels, image_dir=None if images is None else Path(images).absolute(), **cols)
    elif images is not None:
        dataset = load_dataset(images, **cols)
    else:
        raise ConfigError(f"no images: give {dash}images DIR --labels CSV or {dash}data PATH")
    split = getattr(args, f"{pre}split") or default_split
    if split not in dataset.splits and len(dataset.splits) == 1:
        split = next(iter(dataset.splits))  # a folder without a split column: all is "train"
    return private_set(dataset, split)


def run_anonymize(args: argparse.Namespace) -> int:
    import torch

    from medveil.anonymize.alignment import REFERENCE_LAMBDA_S, AlignConfig
    from medveil.anonymize.pipeline import AnonymizeConfig, anonymize, check_k
    from medveil.anonymize.quick import (
        QUICK_ENCODER_STEPS, QUICK_GAN_STEPS, load_models, quick_models,
    )
    from medveil.anonymize.release import AUDIT_NOTE
    from medveil.data.tensors import to_tensor

    if args.encoder is not None and args.gan is None:
        raise ConfigError("--encoder needs --gan (with --quick the encoder is trained)")
    progress = False if args.no_progress else None
    data = load_images_arg(args)
    check_k(args.k, len(data.images), data.patient_ids, data.source)  # before any training
    align_kw = {"steps": args.steps, "lr": args.lr, "patches": args.patches,
                "gram_scale": args.gram_scale}
    if args.lambda_c is not None:
        align_kw["lambda_c"] = args.lambda_c
    if args.lambda_s is not None:
        align_kw["lambda_s"] = args.lambda_s
    elif args.gram_scale == "sum":
        align_kw["lambda_s"] = REFERENCE_LAMBDA_S
    cfg = AnonymizeConfig(k=args.k, grouping=args.grouping, stratify_labels=args.stratify_labels,
                          feature_net=args.feature_net,
                          style_net=args.style_net, align=AlignConfig(**align_kw),
                          invert_steps=args.invert_steps, batch_groups=args.batch_groups,
                          seed=args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        x = to_tensor(data.images, channels=data.images.shape[-1])
        models = quick_models(x, args.out / ".work" / "quick-models",
                              gan_steps=args.quick_gan_steps or QUICK_GAN_STEPS,
                              encoder_steps=(QUICK_ENCODER_STEPS if args.quick_encoder_steps is None
                                             else args.quick_encoder_steps),
                              seed=args.seed, progress=progress, device=device)
    else:
        models = load_models(args.gan, args.encoder, device)
    result = anonymize(data, models, args.out, cfg, overwrite=args.overwrite, progress=progress)
    rep = result.report
    people = (f"{rep['n_members']} people" if rep.get("n_patients") is None
              else f"{rep['n_members']} images of {rep['n_patients']} people")
    print(f"medveil: released {rep['n_images']} images made from {people} "
          f"(k={rep['k']}, grouping {cfg.grouping}"
          f"{' within labels' if cfg.stratify_labels else ''}, by {rep['group_by']}) to "
          f"{result.release.release_dir}")
    print(f"medveil: report {result.release.report_path}; check it with "
          f"`medveil verify-release {args.out}`")
    print(f"medveil: IMPORTANT: {AUDIT_NOTE} ({result.release.audit_dir})", file=sys.stderr)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from medveil.anonymize.pipeline import to_uint8
    from medveil.data.tensors import to_tensor
    from medveil.evaluate.release_eval import (
        baseline_sets, evaluate_sets, format_table, index_groups, read_release,
    )
    from medveil.evaluate.utility import UtilityConfig
    from medveil.models.features import build_feature_net

    if args.json is not None and (args.out / "release") in args.json.resolve().parents:
        raise ConfigError(f"--json {args.json}: must not be inside the release folder")
    release = read_release(args.out)
    report = json.loads((args.out / "report.json").read_text()) if (
        args.out / "report.json").is_file() else {}
    k = int(report.get("k") or min(len(m) for m in release.members))
    private = load_images_arg(args)
    test = load_images_arg(args, "test", default_split="test")
    size, channels = release.images.shape[1], release.images.shape[3]
    at_size = lambda imgs: to_uint8(to_tensor(imgs, size=size, channels=channels))  # noqa: E731
    n_cls = len(private.class_names)
    private_reals = at_size(private.images)
    sets = baseline_sets(index_groups(release, private.ids, str(args.out)), private.labels,
                         n_cls, private_reals, ksalsa=release.images)
    heldout = None
    if args.test_release is not None:
        held = read_release(args.test_release)
        heldout = baseline_sets(index_groups(held, test.ids, str(args.test_release)),
                                test.labels, n_cls, at_size(test.images), ksalsa=held.images)
    cfg = UtilityConfig(epochs=args.epochs, seeds=tuple(range(args.seeds)))
    net = build_feature_net(args.feature_net)
    results = evaluate_sets(sets, private_reals, test.images, test.labels, n_cls, k, net,
                            heldout_sets=heldout, utility=cfg, per_image=args.json is not None,
                            progress=False if args.no_progress else None)
    print(format_table(results, f"{args.out}: k={k}, feature net {net.name}, "
                                f"{len(test.images)} real test images"))
    print("NN re-identification against the private images (nearest private image is a "
          "member; chance |group|/N): " + ", ".join(
              f"{name} {r['nn_reid_private']['nn_reid_rate']:.3f} "
              f"(chance {r['nn_reid_private']['chance']:.3f})" for name, r in results.items()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"release": str(args.out), "k": k, "feature_net": net.describe(),
                   "utility_config": cfg.to_dict(), "results": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0
