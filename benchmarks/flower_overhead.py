"""What Flower costs: the same small federation in-process vs over Flower on loopback.

Federation: the demo's tiny ViT (28 px, patch 7, dim 96, depth 4), five sites (``--sites N``:
the first N) = five shipped MedMNIST samples (blood, organ CT, breast US, chest X-ray, skin; 300
train images each), the server's unlabelled pool = the retinamnist sample (560 images, labels
ignored; no site holds it), strategy distill (--strategy), 3 stages of 2 local epochs, one torch
thread per process on both engines (same seed: the final weights must agree).
Flower: a SuperLink with TLS + SuperNode authentication and one SuperNode per site, all on
127.0.0.1 (medveil.federated.flower.pilot.LocalPilot). Per stage it prints wall time (the
engine's own per-stage clock, same code on both sides), the bytes the engine accounts
(torch.save size of every message, identical on both engines) and the bytes in Flower's records
(Flower's ``count_bytes``), and the CPU seconds of all processes (of those that were reaped:
ClientApp processes whose SuperExec is killed at the end are missed, so this undercounts).
Stage 1 over Flower includes the one-time join round (sites tell their class counts); a stage's
evaluation rides in the next stage's training messages, so the last stage holds the one extra
evaluation round of the run. The summary gives the overhead over the stages between those two
(the steady state of a longer federation), after the join (with the final evaluation) and over
all stages. The machine is shared and a stage lasts ~10 s, so one pair is noisy (+15% .. +45%
seen for the same code): the pair runs ``--repeat`` times (default 3) and the summary is the
median and range of the overhead of the summed stage times.

    .venv/bin/python benchmarks/flower_overhead.py            # 3 repeats, ~10 min on the shared 2-core box
    .venv/bin/python benchmarks/flower_overhead.py --repeat 1 --rounds 1 --local-epochs 1   # quicker
    .venv/bin/python benchmarks/flower_overhead.py --data-dir ../shared/data/medmnist \
        --max-train 5000 --max-test 1000 --out benchmarks/results/flower_overhead_5000.json
    .venv/bin/python benchmarks/flower_overhead.py --sites 1 \
        --out benchmarks/results/flower_overhead_1site.json   # no other site competes for the CPU
Writes benchmarks/results/flower_overhead.json.

Sites run MedVeil's warm ClientApp runtime (``medveil.federated.flower.site_node``: ClientApps
forked from a preloaded process); ``--app-runtime flower`` measures Flower's own (a fresh
``flwr-clientapp`` process per message, ~4 s of imports, 3 s SuperNode poll):

    .venv/bin/python benchmarks/flower_overhead.py --app-runtime flower \
        --out benchmarks/results/flower_overhead_plain.json

Each stage also reports its wall time per phase (fit / curate / evaluate) on both engines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SITES = {"blood": "bloodmnist", "organ-ct": "organamnist", "breast-us": "breastmnist",
         "chest-xray": "pneumoniamnist", "skin": "ham10000"}
POOL_SAMPLE = "retinamnist"


def site_data(args: argparse.Namespace) -> dict[str, str]:
    """Site name -> dataset (the shipped samples, or the full files of ``--data-dir``) of the
    first ``--sites`` sites."""
    chosen = list(SITES.items())[: args.sites]
    if args.data_dir is None:
        return {n: f"sample:{s}" for n, s in chosen}
    return {n: str((args.data_dir / f"{s}.npz").resolve()) for n, s in chosen}


def federation(args: argparse.Namespace, sites: dict[str, str], pool: Path, with_data: bool = True) -> dict:
    model = {"img_size": 28, "patch_size": 7, "in_chans": 3, "embed_dim": 96, "depth": 4, "num_heads": 3,
             "decoder_embed_dim": 64, "decoder_depth": 1, "decoder_num_heads": 4}
    return {
        "seed": 0, "model": model,
        "data": {"pool_path": str(pool), "max_train": args.max_train, "max_test": args.max_test},
        "pretrain": {"epochs": args.pretrain_epochs, "batch_size": 64, "lr": 1e-3, "warmup_epochs": 1},
        "federation": {"strategy": args.strategy, "rounds": args.rounds},
        "local": {"epochs": args.local_epochs, "batch_size": 32, "lr": 5e-4, "class_weighting": "balanced"},
        "curation": {"epochs": args.curation_epochs, "lr": 1e-3},
        "clients": [_client(n, d) if with_data else {"name": n} for n, d in sites.items()],
    }


def _client(name: str, data: str) -> dict[str, str]:
    return {"name": name, "sample": data.removeprefix("sample:")} if data.startswith("sample:") \
        else {"name": name, "path": data}


def cpu_seconds(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def per_stage(metrics: dict) -> list[dict]:
    rows = []
    for stage in metrics["stages"][1:]:
        engine_bytes = sum(sum(info.get("bytes", {}).values()) for info in stage["clients"].values())
        wire = sum(sum(info.get("wire_bytes", {}).values()) for info in stage["clients"].values())
        rows.append({"stage": stage["stage"], "seconds": stage["seconds"],
                     "phases": stage.get("phase_seconds", {}), "engine_bytes": engine_bytes,
                     "flower_record_bytes": wire or None, "absent": len(stage.get("absent", [])),
                     "rejected": len(stage["rejected"])})
    return rows


def max_abs_diff(a: Path, b: Path) -> float:
    x, y = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    diff = [float((x["model"][k] - y["model"][k]).abs().max()) for k in x["model"]]
    for n, head in x["extra"]["heads"].items():
        diff += [float((head[k] - y["extra"]["heads"][n][k]).abs().max()) for k in head]
    return max(diff)


def one_pair(args: argparse.Namespace, work: Path) -> dict:
    """The federation in-process, then over Flower on loopback; per-stage rows and totals."""
    import tomli_w

    from medveil.data.samples import sample_path
    from medveil.federated.config import config_from_dict
    from medveil.federated.engine import run_federation
    from medveil.federated.flower.pilot import LocalPilot

    pool = sample_path(POOL_SAMPLE)
    sites = site_data(args)
    cfg = config_from_dict(federation(args, sites, pool), work)

    print("in-process engine ...", flush=True)
    t0, c0 = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF)
    local = run_federation(cfg, work / "local", progress=False)
    local_wall, local_cpu = time.perf_counter() - t0, cpu_seconds(resource.RUSAGE_SELF) - c0

    print(f"Flower (SuperLink + {len(sites)} SuperNodes, TLS + auth, loopback, {args.app_runtime} "
          f"ClientApp runtime) ...", flush=True)
    coordinator = work / "coordinator.toml"
    coordinator.write_text(tomli_w.dumps(federation(args, sites, pool, with_data=False)))
    c0 = cpu_seconds(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with LocalPilot(work / "pilot", sites, threads=1, app_runtime=args.app_runtime) as pilot:
        pilot.create_pki()
        pilot.start_link()
        pilot.register()
        for name in sites:
            pilot.start_site(name)
        t_ready = time.perf_counter()
        status = pilot.run(coordinator, work / "flower", timeout=3600, stage_timeout=1800.0,
                           join_timeout=120.0)
        t_done = time.perf_counter()
    flower_cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - c0
    if status != "finished:completed":
        raise SystemExit(f"Flower run ended with {status}")
    flower = json.loads((work / "flower" / "metrics.json").read_text())
    rows = []
    for a, b in zip(per_stage(local), per_stage(flower), strict=True):
        rows.append({"stage": a["stage"], "inprocess_s": a["seconds"], "flower_s": b["seconds"],
                     "overhead_pct": 100.0 * (b["seconds"] / a["seconds"] - 1.0),
                     "extra_s": b["seconds"] - a["seconds"],
                     "phases_inprocess_s": a["phases"], "phases_flower_s": b["phases"],
                     "engine_bytes": a["engine_bytes"], "engine_bytes_flower": b["engine_bytes"],
                     "flower_record_bytes": b["flower_record_bytes"], "absent": b["absent"]})
    return {"stages": rows, "max_abs_weight_diff": max_abs_diff(work / "local" / "model.pt",
                                                                 work / "flower" / "model.pt"),
            "inprocess_total_s": local_wall, "inprocess_cpu_s": local_cpu,
            "flower_startup_s": t_ready - t0, "flower_run_s": t_done - t_ready,
            "flower_cpu_s_all_processes": flower_cpu}


def print_pair(pair: dict) -> None:
    rows = pair["stages"]
    print(f"\n{'stage':>5} {'in-process s':>13} {'Flower s':>9} {'extra s':>8} {'overhead':>9} "
          f"{'MB (engine)':>12} {'MB (Flower records)':>20}")
    for r in rows:
        print(f"{r['stage']:>5} {r['inprocess_s']:>13.1f} {r['flower_s']:>9.1f} {r['extra_s']:>8.1f} "
              f"{r['overhead_pct']:>8.0f}% "
              f"{r['engine_bytes'] / 1e6:>12.2f} {r['flower_record_bytes'] / 1e6:>20.2f}")
    print("wall seconds per phase (in-process / Flower): "
          + "; ".join(f"stage {r['stage']}: " + ", ".join(
              f"{k} {r['phases_inprocess_s'].get(k, 0):.1f} / {v:.1f}" for k, v in r["phases_flower_s"].items())
              for r in rows))
    print(f"whole run: in-process {pair['inprocess_total_s']:.0f} s ({pair['inprocess_cpu_s']:.0f} CPU-s); "
          f"Flower {pair['flower_run_s']:.0f} s after {pair['flower_startup_s']:.0f} s start-up "
          f"({pair['flower_cpu_s_all_processes']:.0f} CPU-s in the Flower processes that were reaped); "
          f"final weights: max |in-process - Flower| = {pair['max_abs_weight_diff']:.2e}")


def summarise(pairs: list[dict]) -> dict:
    """Overhead of the summed stage times, per repeat; median / min / max over the repeats."""
    def pct(rows: list[dict]) -> float | None:
        if not rows:
            return None
        return 100.0 * (sum(r["flower_s"] for r in rows) / sum(r["inprocess_s"] for r in rows) - 1.0)

    def over(keep) -> list[float]:
        last = max(r["stage"] for r in pairs[0]["stages"])
        found = [pct([r for r in p["stages"] if keep(r["stage"], last)]) for p in pairs]
        return [x for x in found if x is not None]

    all_pct = over(lambda s, last: True)
    later = over(lambda s, last: s > 1)
    steady = over(lambda s, last: 1 < s < last)
    stat = (lambda xs: {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None)
    return {"overhead_pct_all_stages": stat(all_pct), "overhead_pct_after_join": stat(later),
            "overhead_pct_steady": stat(steady), "per_repeat_steady": steady,
            "per_repeat_after_join": later,
            "extra_s_per_stage_after_join": stat([r["extra_s"] for p in pairs for r in p["stages"]
                                                  if r["stage"] > 1]),
            "max_abs_weight_diff": max(p["max_abs_weight_diff"] for p in pairs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", default="distill", choices=("distill", "fedavg", "relay"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--curation-epochs", type=float, default=5.0)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with the sites' full MedMNIST .npz files (default: shipped samples)")
    parser.add_argument("--max-train", type=int, default=0, help="train images per site (0 = all)")
    parser.add_argument("--max-test", type=int, default=0, help="test images per site (0 = all)")
    parser.add_argument("--sites", type=int, default=len(SITES), choices=range(1, len(SITES) + 1),
                        help="the first N of the five sites (1: no site competes for the CPU)")
    parser.add_argument("--app-runtime", choices=("warm", "flower"), default="warm",
                        help="sites' ClientApp runtime: warm (forked from a preloaded process, "
                             "MedVeil's default) or flower (a fresh process per message)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="run the in-process / Flower pair this many times (the machine is shared: "
                             "the summary gives the median and range over the repeats)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "flower_overhead.json")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="keep each repeat's run folders and Flower logs under DIR/repeat_N "
                             "(FLWR_LOG_LEVEL=DEBUG adds timestamps to the logs)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    from medveil.io import write_json_atomic

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    pairs = []
    for rep in range(args.repeat):
        if args.repeat > 1:
            print(f"== repeat {rep + 1}/{args.repeat}", flush=True)
        if args.keep is not None:
            work = args.keep / f"repeat_{rep + 1}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            pairs.append(one_pair(args, work))
        else:
            with tempfile.TemporaryDirectory(prefix="medveil-flower-bench-") as tmp:
                pairs.append(one_pair(args, Path(tmp)))
        print_pair(pairs[-1])
    summary = summarise(pairs) | {"load_average_before": load_before, "load_average_after": os.getloadavg()}
    print(f"\noverhead of the stage times over {args.repeat} repeat(s), median (range):")
    for key, what in (("overhead_pct_steady", "stages between the join and the last (steady state)"),
                      ("overhead_pct_after_join", "stages after the join (with the final evaluation)"),
                      ("overhead_pct_all_stages", "all stages")):
        if summary[key]:
            print(f"  {summary[key]['median']:+5.0f}% ({summary[key]['min']:+.0f}% .. "
                  f"{summary[key]['max']:+.0f}%)  {what}")
    print(f"load average before/after: {load_before[0]:.1f} / {summary['load_average_after'][0]:.1f} "
          f"on {os.cpu_count()} cores")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "settings": vars(args) | {"out": str(args.out), "keep": args.keep and str(args.keep)},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
              "repeats": pairs, "stages": pairs[-1]["stages"], "summary": summary}
    write_json_atomic(args.out, result)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
