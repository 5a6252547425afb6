"""``medveil data info PATH``: what a dataset holds, without decoding its images."""

from __future__ import annotations

import argparse

from medveil.data.roots import ENV_VAR


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="inspect datasets",
                                 description="Inspect datasets (.npz, image folder + CSV, DICOM).")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    info = sub.add_parser(
        "info", help="counts per split and class, image size, channels, modality, task",
        description="Print name, source, modality, task, image size, channels, classes and a "
                    "table of image counts per split and class. Reads labels and one image "
                    "header; does not decode the images.",
    )
    info.add_argument("path", metavar="PATH",
                      help="a .npz file, a folder of images with a CSV (or the CSV), a .dcm file "
                           f"or folder; or a name under --data-root / ${ENV_VAR}; or sample:NAME")
    add_dataset_options(info)
    info.set_defaults(func=run_info)
    check = sub.add_parser(
        "check", help="decode every image and report the first bad one",
        description="Load the dataset and decode every image of every split (what training "
                    "will do), stopping at the first unreadable file with its CSV row.",
    )
    check.add_argument("path", metavar="PATH", help="as for 'data info'")
    add_dataset_options(check)
    check.set_defaults(func=run_check)
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    """Options every command that reads a dataset shares (see ``dataset_kwargs``)."""
    group = parser.add_argument_group("dataset options")
    group.add_argument("--data-root", metavar="DIR",
                       help=f"folder that bare dataset names resolve in (default: ${ENV_VAR})")
    group.add_argument("--id-column", metavar="NAME", help="CSV column with the image id / file")
    group.add_argument("--label-column", metavar="NAME", help="CSV column with the label")
    group.add_argument("--patient-column", metavar="NAME",
                       help="CSV column with a patient/subject id")
    group.add_argument("--split-column", metavar="NAME",
                       help="CSV column naming each row's split (train/val/test)")
    group.add_argument("--image-dir", metavar="DIR",
                       help="folder of the images, relative to the CSV (default: auto-detect)")
    group.add_argument("--classes", metavar="A,B,...", type=lambda s: [c.strip() for c in s.split(",")],
                       help="class names in index order (default: the sorted label values)")
    group.add_argument("--task", choices=("multi-class", "binary", "ordinal"),
                       help="task of an image folder (default: binary for 2 classes, else "
                            "multi-class)")
    group.add_argument("--size", type=int, metavar="PX",
                       help="resize folder/DICOM images to PX x PX (default: most common size)")


def dataset_kwargs(args: argparse.Namespace) -> dict:
    """load_dataset keyword arguments from the options of :func:`add_dataset_options`."""
    return dict(
        data_root=args.data_root, id_column=args.id_column, label_column=args.label_column,
        patient_column=args.patient_column, split_column=args.split_column,
        image_dir=args.image_dir, classes=args.classes, task=args.task, size=args.size,
    )


def run_info(args: argparse.Namespace) -> int:
    from medveil.data.loading import load_dataset
    from medveil.data.summary import describe

    dataset = load_dataset(args.path, **dataset_kwargs(args))
    print(describe(dataset))
    return 0


def run_check(args: argparse.Namespace) -> int:
    from medveil.data.duplicates import split_overlaps
    from medveil.data.loading import load_dataset

    dataset = load_dataset(args.path, **dataset_kwargs(args))
    for name, split in dataset.splits.items():
        n, h, w, c = split.images.shape
        print(f"{name}: {n} images decoded, {w} x {h} x {c}")
    # identical images across splits are not an error, but a test score counts them as unseen
    for line in split_overlaps({name: (s.images, s.labels) for name, s in dataset.splits.items()}):
        print(f"duplicates: {line}")
    print(f"{dataset.source}: OK")
    return 0
