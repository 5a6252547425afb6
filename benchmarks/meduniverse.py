"""MedUniverse benchmark: the federated universal model vs its baselines on six MedMNIST-format
datasets (28 px, six modalities) of ../shared/data/medmnist.

Full mode runs the shipped recipe (src/medveil/configs/medmnist6.toml: hybrid stem, three stages of
15 local epochs, 20 distillation passes with pool balance, head calibration) at smaller sizes, see
FULL; quick mode and --previous run their own short-stage recipes (QUICK, FULL_PREVIOUS).
Per seed, every method starts from the SAME stage-0 backbone (MAE on the server pool, held
apart from every train split) and gets the same budget (R stages x E local epochs; baselines
R*E epochs):
  meduniverse  federation, strategy "distill" (our reconstruction, the default)
  fedavg       federation, FedAvg backbones + per-client heads (FedPer-style)
  fedprox      as fedavg with the FedProx term (mu = 0.01)                          [quick, --all-methods]
  relay        federation, strategy "relay" (sequential, next base = last client's backbone)   [idem]
  local_only   each client alone, ViT from random init, R*E epochs                             [idem]
  centralised  all labelled data pooled, one backbone + per-client heads, R*E epochs (upper bound) [idem]
  mim_only     the stage-0 backbone (the paper's baseline), evaluated by (ii) only
  alone_small_cnn / alone_resnet18   what a hospital does instead: a small CNN / ResNet-18 from
               scratch on exactly its own train images, its own recipe (medveil.evaluate.site_alone)
  published    MedMNIST v2 ResNet-18 (28), all train images, GPU: a reference row, not a run
  +cal         meduniverse / fedavg with head calibration ([federation] calibrate_heads: after the
               last stage the clients refit their heads on the final backbone); same backbone,
               so (ii) is that of the method without it. Full mode calibrates, as shipped: its
               plain rows are the models the clients received before calibration.
Evaluations: (i) the model with the client's own head on its test split; (ii) the backbone
fine-tuned (same recipe for all) and linearly probed (logistic regression on frozen features).
LODO: for each held-out dataset, pretrain on a pool of the five others, federate them, then
probe / fine-tune on the held-out dataset; compared with that stage-0 MIM backbone and with the
held-out site alone (small CNN on its own train images).
Cost: CPU-minutes per seed for every method's training, all sites together (process CPU time).
Statistics: mean +/- std over seeds; paired two-sided Wilcoxon signed-rank and paired t-test
over (dataset, seed) pairs (medveil.evaluate.stats).

    python benchmarks/meduniverse.py --quick      # 4.7 min from scratch on 2 cores (9.0 job-min)
    python benchmarks/meduniverse.py              # full: 3 seeds + LODO (seed 0): 86 min from scratch (160 job-min)
    python benchmarks/meduniverse.py --previous   # the full setting until 2026-12-04: 55 min
    python benchmarks/meduniverse.py --previous --seeds 5 --lodo-seeds 3 --out benchmarks/results/meduniverse_previous_5seeds.json
Each finished job (a seed of the main comparison, its centralised baseline, its calibrated runs, a LODO
fold, the sites alone) is stored under benchmarks/results/jobs/ with its settings; a killed or
interrupted run resumes from there.
Writes benchmarks/results/meduniverse[_quick|_previous].json and prints the tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from medveil.evaluate.probe import backbone_eval
from medveil.evaluate.site_alone import SiteAloneRecipe, train_site_alone
from medveil.federated.baselines import centralised, local_only
from medveil.federated.config import FederationConfig, config_from_dict
from medveil.federated.curation import make_curator
from medveil.federated.records import StageRecord
from medveil.federated.stages import Federation, prepare, run_stages
from medveil.io import jsonable, write_json_atomic
from medveil.federated.server import Server
from medveil.federated.training import derive_seed
from medveil.models.cnn import CNN_ARCHS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from meduniverse_settings import FULL, FULL_PREVIOUS, QUICK, SECTIONS  # noqa: E402 (other benchmarks import them here)
from meduniverse_tables import CALIBRATED, DATASETS, tables  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NO_BALANCE = {"pool_balance": False}  # a distill option; the shipped recipe sets it
FEDERATED = {  # method -> config overrides
    "meduniverse": {"federation": {"strategy": "distill"}},
    "fedavg": {"federation": {"strategy": "fedavg"}, "curation": NO_BALANCE},
    "fedprox": {"federation": {"strategy": "fedavg"}, "local": {"fedprox_mu": 0.01}, "curation": NO_BALANCE},
    "relay": {"federation": {"strategy": "relay"}, "curation": NO_BALANCE},
}
# A setting without "methods" (QUICK, FULL_PREVIOUS) runs them all; mim_only and the site alone always run.
ALL_METHODS = (*FEDERATED, "local_only", "centralised")
FINETUNED = ("mim_only", "meduniverse", "fedavg")  # backbones also fine-tuned in (ii); all are probed
# The centralised baseline is a job of its own ("central", cached apart from the seed's other
# methods). Version 2: pooled training with the clients' recipe (class weights, head lr scale);
# version 1 (inside the seed jobs, whose cached "centralised" entries are ignored) used neither.
CENTRAL_VERSION = 2
# Head calibration ([federation] calibrate_heads, the shipped configs' setting): a job of its own
# ("calibrated") that runs the federation again with it, for MedUniverse and FedAvg. It leaves
# the backbone unchanged, so the probe / fine-tune numbers of the seed job hold for it too.
CALIBRATED_VERSION = 1
# Version 2 of a LODO fold adds the held-out site alone (small CNN); version-1 folds are rerun.
LODO_VERSION = 2
# Version 2 of a seed job records each method's training CPU time ("_cpu"); version-1 jobs are rerun.
SEED_VERSION = 2
# Version 1 of the site-alone key: the sites' data only (before it, the whole setting).
ALONE_VERSION = 1
VERSIONS = {"seed": SEED_VERSION, "central": CENTRAL_VERSION, "calibrated": CALIBRATED_VERSION,
            "lodo": LODO_VERSION}  # each job kind's cache-key version


def make_config(setting: dict[str, Any], data_dir: Path, seed: int, names: tuple[str, ...],
                overrides: dict[str, Any] | None = None) -> FederationConfig:
    raw: dict[str, Any] = {"seed": seed, "clients": [{"name": n, "path": str(data_dir / f"{n}.npz")} for n in names]}
    for section in SECTIONS:
        raw[section] = dict(setting[section])
    for section, values in (overrides or {}).items():
        raw[section].update(values)
    return config_from_dict(raw, data_dir)


def pretrained(setting: dict[str, Any], data_dir: Path, seed: int) -> tuple[FederationConfig, Federation, StageRecord]:
    """The seed's six-client federation after stage 0 (MIM pretraining; deterministic, so every
    job of a seed starts from the same backbone): (config, federation, stage-0 record)."""
    cfg = make_config(setting, data_dir, seed, DATASETS)
    base = prepare(cfg)
    return cfg, base, run_stages(base, 0, 1, progress=False)[0]


def fork(base: Federation, cfg: FederationConfig, stage0: dict[str, Any]) -> Federation:
    """A federation on the same clients and pool, starting from the shared stage-0 server."""
    server = Server(cfg.model, base.server.pool)
    server.pool_groups = base.server.pool_groups
    server.load_state_dict(copy.deepcopy(stage0))
    return Federation(cfg, base.clients, server, make_curator(cfg.federation.strategy, cfg.curation))


def run_seed(setting: dict[str, Any], data_dir: Path, seed: int, log: list[str]) -> dict[str, Any]:
    """All methods for one seed: results[method][dataset] = {"universal"|"probe"|"finetune": metrics}."""
    t0 = time.time()
    cfg, base, pre = pretrained(setting, data_dir, seed)
    stage0 = base.server.state_dict()
    mim_state = base.server.backbone_state()
    recipe_eval = cfg.evaluation.finetune_recipe(cfg.local)
    eval_seed = derive_seed(seed, "bench-eval")
    results: dict[str, Any] = {"mim_only": backbone_eval(cfg.model.to_dict(), mim_state, base.clients, recipe_eval,
                                                         eval_seed, cfg.evaluation.probe_C)}
    timing = {"pretrain": pre.seconds}
    log.append(f"seed {seed}: pretrain {pre.seconds:.0f}s, MIM loss {pre.mim_loss[0]:.3f} -> "
               f"{pre.mim_loss[-1]:.3f}")
    cpu = {"pretrain": pre.cpu_seconds}  # CPU-seconds of training only (evaluation (ii) apart)
    methods = setting.get("methods", ALL_METHODS)
    for method in (m for m in FEDERATED if m in methods):
        t = time.time()
        mcfg = make_config(setting, data_dir, seed, DATASETS, FEDERATED[method])
        fed = fork(base, mcfg, stage0)
        stages = run_stages(fed, 1, mcfg.federation.rounds + 1, progress=False)
        cpu[method] = sum(s.cpu_seconds or 0.0 for s in stages)
        last = stages[-1].clients
        per = backbone_eval(mcfg.model.to_dict(), fed.server.backbone_state(), base.clients, recipe_eval,
                            eval_seed, cfg.evaluation.probe_C, finetune=method in FINETUNED)
        calibrated = mcfg.federation.calibrate_heads and f"{method}+cal" in CALIBRATED
        for name in per:  # with calibration (the shipped recipe): the received model is the plain row
            per[name]["universal"] = (last[name].test_before_calibration if mcfg.federation.calibrate_heads
                                      else last[name].test)
        if calibrated:
            results[f"{method}+cal"] = {n: {"universal": c.test, "before_calibration": c.test_before_calibration}
                                        for n, c in last.items()}
        results[method] = per
        results.setdefault("_stages", {})[method] = [
            {n: c.test["acc"] for n, c in s.clients.items() if c.test} for s in stages]
        results.setdefault("_bytes", {})[method] = {
            n: dict(stages[-1].clients[n].bytes) for n in last}
        timing[method] = time.time() - t
    if "local_only" in methods:
        budget = replace(cfg.local, epochs=cfg.federation.rounds * cfg.local.epochs, fedprox_mu=0.0)
        t, c = time.time(), time.process_time()
        results["local_only"] = {n: {"universal": m} for n, m in
                                 local_only(cfg.model, base.clients, budget, derive_seed(seed, "local")).items()}
        timing["local_only"], cpu["local_only"] = time.time() - t, time.process_time() - c
    results["_timing"] = timing
    results["_cpu"] = cpu
    log.append(f"seed {seed}: done in {time.time() - t0:.0f}s "
               + ", ".join(f"{k} {v:.0f}s" for k, v in timing.items()))
    return results


def run_central(setting: dict[str, Any], data_dir: Path, seed: int, log: list[str]) -> dict[str, Any]:
    """The centralised upper bound of one seed: the seed's stage-0 MIM backbone (pretrained again,
    deterministically), all labelled data pooled, R*E epochs with the clients' recipe."""
    t0 = time.time()
    cfg, base, pre = pretrained(setting, data_dir, seed)
    budget = replace(cfg.local, epochs=cfg.federation.rounds * cfg.local.epochs, fedprox_mu=0.0)
    t = time.time()
    result = {n: {"universal": m} for n, m in centralised(cfg.model, base.server.backbone_state(), base.clients,
                                                          budget, derive_seed(seed, "central")).items()}
    log.append(f"seed {seed} centralised: pretrain {pre.seconds:.0f}s (MIM loss {pre.mim_loss[0]:.3f} -> "
               f"{pre.mim_loss[-1]:.3f}), pooled training {time.time() - t:.0f}s, {time.time() - t0:.0f}s in all")
    return result


def run_calibrated(setting: dict[str, Any], data_dir: Path, seed: int, log: list[str]) -> dict[str, Any]:
    """MedUniverse and FedAvg with head calibration, from the seed's stage-0 backbone (pretrained
    again, deterministically): the universal model's metrics with the refitted heads, and those
    of the model the clients received (before calibration: the seed job's universal numbers)."""
    t0 = time.time()
    _, base, _ = pretrained(setting, data_dir, seed)
    stage0 = base.server.state_dict()
    result: dict[str, Any] = {}
    for method, plain in CALIBRATED.items():
        overrides = copy.deepcopy(FEDERATED[plain])
        overrides.setdefault("federation", {})["calibrate_heads"] = True
        mcfg = make_config(setting, data_dir, seed, DATASETS, overrides)
        last = run_stages(fork(base, mcfg, stage0), 1, mcfg.federation.rounds + 1, progress=False)[-1].clients
        result[method] = {n: {"universal": c.test, "before_calibration": c.test_before_calibration}
                          for n, c in last.items()}
    log.append(f"seed {seed} calibrated: {time.time() - t0:.0f}s")
    return result


def run_alone(setting: dict[str, Any], data_dir: Path, seed: int, log: list[str]) -> dict[str, Any]:
    """Each site alone: a small CNN and a ResNet-18 from scratch on exactly the train images it
    holds in the federation (same splits, same test images), with their CPU-seconds. A setting's
    ``resnet_seeds`` (full mode: 1, since it costs 19 CPU-min per seed against the small CNN's 2)
    limits the ResNet-18 to the first seeds."""
    cfg = make_config(setting, data_dir, seed, DATASETS)
    clients = prepare(cfg).clients
    result: dict[str, Any] = {}
    for arch in (a for a in CNN_ARCHS if a != "resnet18" or seed < setting.get("resnet_seeds", seed + 1)):
        result[f"alone_{arch}"] = {c.name: {"universal": train_site_alone(arch, c, SiteAloneRecipe(),
                                                                          derive_seed(seed, "alone"))}
                                   for c in clients}
        cpu = sum(m["universal"]["cpu_seconds"] for m in result[f"alone_{arch}"].values())
        log.append(f"seed {seed} alone {arch}: {cpu / 60:.1f} CPU-min for all six sites")
    return result


def run_lodo(setting: dict[str, Any], data_dir: Path, seed: int, held: str) -> dict[str, Any]:
    """Federate (distill) on the five other datasets; probe / fine-tune the held-out one."""
    others = tuple(n for n in DATASETS if n != held)
    cfg = make_config(setting, data_dir, seed, others)
    fed = prepare(cfg)
    target_cfg = make_config(setting, data_dir, seed, (held,))
    target = prepare(target_cfg).clients  # the held-out site's data (its pool share unused)
    run_stages(fed, 0, 1, progress=False)
    mim_state = fed.server.backbone_state()
    run_stages(fed, 1, cfg.federation.rounds + 1, progress=False)
    recipe = cfg.evaluation.finetune_recipe(cfg.local)
    s = derive_seed(seed, "lodo-eval")
    return {
        "mim_only": backbone_eval(cfg.model.to_dict(), mim_state, target, recipe, s)[held],
        "meduniverse": backbone_eval(cfg.model.to_dict(), fed.server.backbone_state(), target, recipe, s)[held],
        # the held-out hospital alone: a small CNN on its own train images, its own recipe
        "alone_small_cnn": {"finetune": train_site_alone("small_cnn", target[0], SiteAloneRecipe(), s)},
    }


def alone_key(job: tuple[str, int, str], setting: dict[str, Any], data_dir: Path) -> Any:
    """The cache key of a site-alone job: only what its CNNs see (the sites' splits: seed, [data],
    image size and channels; which seeds get the ResNet-18; the site-alone recipe), so a change of the
    ViT recipe reuses them."""
    return jsonable({"job": list(job), "data": setting["data"], "data_dir": str(data_dir),
                     "img": [setting["model"]["img_size"], setting["model"]["in_chans"]],
                     "resnet_seeds": setting.get("resnet_seeds"), "version": ALONE_VERSION,
                     "site_alone_recipe": asdict(SiteAloneRecipe())})


def run_job(job: tuple[str, int, str], setting: dict[str, Any], data_dir: Path,
            cache: Path | None = None) -> tuple[Any, list[str], float]:
    """One seed of the main comparison, or one LODO fold; returns (result, log lines, seconds). With
    ``cache`` (a folder) a finished job's result is stored there and reused by a rerun with the
    same setting, so a killed benchmark resumes job by job."""
    kind, seed, held = job
    key = alone_key(job, setting, data_dir) if kind == "alone" else jsonable({
        "job": list(job), "setting": setting, "data_dir": str(data_dir), "version": VERSIONS[kind],
        # a LODO fold trains the held-out site alone too: a change of that recipe reruns it
        **({"site_alone_recipe": asdict(SiteAloneRecipe())} if kind == "lodo" else {})})
    path = cache / f"{kind}-{seed}{'-' + held if held else ''}.json" if cache else None
    if path is not None and path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["result"], stored["log"] + ["(cached)"], stored["seconds"]
    t = time.time()
    log: list[str] = []
    if kind == "seed":
        result = run_seed(setting, data_dir, seed, log)
    elif kind == "central":
        result = run_central(setting, data_dir, seed, log)
    elif kind == "calibrated":
        result = run_calibrated(setting, data_dir, seed, log)
    elif kind == "alone":
        result = run_alone(setting, data_dir, seed, log)
    else:
        result = run_lodo(setting, data_dir, seed, held)
        log = [f"LODO seed {seed} held-out {held}: {time.time() - t:.0f}s"]
    seconds = time.time() - t
    if path is not None:
        write_json_atomic(path, {"key": key, "result": result, "log": log, "seconds": seconds})
    return result, log, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings, < 10 min on 2 cores")
    parser.add_argument("--previous", action="store_true", help="the full setting until 2026-12-04 "
                        "(FULL_PREVIOUS: its own short-stage recipe; meduniverse_previous*.json)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 3)")
    parser.add_argument("--no-lodo", action="store_true", help="skip leave-one-dataset-out")
    parser.add_argument("--all-methods", action="store_true", help="full mode with FedProx, relay, local ViT "
                        "and centralised ViT too (quick mode always runs them; the extra time is not measured)")
    parser.add_argument("--lodo-seeds", type=int, help="leave-one-dataset-out on the first N seeds only "
                        "(default: full mode 1, quick and previous modes every seed)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per worker (default 1: tiny models, robust on a shared machine)")
    parser.add_argument("--workers", type=int, default=2,
                        help="parallel processes over seeds / LODO folds (default 2; results do not depend on it)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get(
        "MEDVEIL_SHARED_DATA", REPO.parent / "shared" / "data")) / "medmnist")
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/meduniverse[_quick|_previous].json)")
    parser.add_argument("--work", type=Path, help="each finished job's numbers are kept here; a rerun with "
                        "the same settings resumes from them (default benchmarks/results/jobs/meduniverse[_quick|_previous])")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    missing = [d for d in DATASETS if not (args.data_dir / f"{d}.npz").is_file()]
    if missing:
        print(f"meduniverse benchmark: datasets missing in {args.data_dir}: {', '.join(missing)}", file=sys.stderr)
        return 2
    mode = "quick" if args.quick else "previous" if args.previous else "full"
    setting = {"quick": QUICK, "previous": FULL_PREVIOUS, "full": FULL}[mode]
    if args.all_methods and "methods" in setting:  # quick and previous modes run them all already
        setting = {**setting, "methods": ALL_METHODS}
    seeds = list(range(args.seeds or setting["seeds"]))
    suffix = "" if mode == "full" else f"_{mode}"
    out = args.out or REPO / "benchmarks" / "results" / f"meduniverse{suffix}.json"
    cache = args.work or REPO / "benchmarks" / "results" / "jobs" / f"meduniverse{suffix}"
    t0 = time.time()
    kinds = ["seed"] + (["central"] if "centralised" in setting.get("methods", ALL_METHODS) else []) \
        + ([] if setting["federation"].get("calibrate_heads") else ["calibrated"])  # else inside "seed"
    jobs = [(kind, seed, "") for seed in seeds for kind in kinds]  # the long jobs first
    if not args.no_lodo:
        jobs += [("lodo", seed, held) for seed in seeds[:args.lodo_seeds or setting.get("lodo_seeds") or len(seeds)]
                 for held in setting["lodo_heldout"]]
    jobs += [("alone", seed, "") for seed in seeds]
    done: dict[tuple[str, int, str], Any] = {}
    log: list[str] = []
    if args.workers <= 1:
        for job in jobs:
            done[job] = run_job(job, setting, args.data_dir, cache)
            log += done[job][1]
            print("\n".join(done[job][1]), flush=True)
    else:  # independent seeds / LODO folds in parallel processes (spawned: no forked OpenMP state)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=torch.set_num_threads,
                                 initargs=(args.threads,)) as pool:
            futures = {pool.submit(run_job, job, setting, args.data_dir, cache): job for job in jobs}
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                log += done[futures[future]][1]
                print("\n".join(done[futures[future]][1]), flush=True)
    results = [{**done[("seed", s, "")][0], **done[("alone", s, "")][0],
                **({"centralised": done[("central", s, "")][0]} if "central" in kinds else {}),
                **(done[("calibrated", s, "")][0] if "calibrated" in kinds else {})} for s in seeds]
    lodo = [{"seed": j[1], "held": j[2], **done[j][0]} for j in jobs if j[0] == "lodo"]
    text, summary = tables(results, lodo)
    elapsed = time.time() - t0
    job_seconds = sum(done[j][2] for j in jobs)
    print(text)
    print(f"\njobs took {job_seconds / 60:.1f} min in all; this call {elapsed / 60:.1f} min ({mode} mode, {len(seeds)} seeds, "
          f"{args.workers} worker(s) x {args.threads} thread(s))")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"mode": mode, "seeds": seeds, "setting": setting,
               "datasets": DATASETS, "elapsed_s": elapsed, "sum_job_s": job_seconds, "machine": platform.platform(),
               "torch_threads": args.threads, "workers": args.workers, "command": " ".join(sys.argv), "summary": summary,
               "results": results, "lodo": lodo, "log": log, "table": text}
    write_json_atomic(out, payload)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
