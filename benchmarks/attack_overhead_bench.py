"""In-federation attack time against standalone attack time: the same attack on the same update, both ways.

For each attack (DLG, Inverting Gradients, GI-SMN-style, SPEAR) on a small case:

- in the federation: `fedsim ...` (the CLI, inline runtime, 1 client, 1 round); the attack's own seconds come
  from results.jsonl;
- standalone: a Python process that computes the same client update with fedsim's own pieces (data, partition,
  model, `local_update` with the client's seed) and calls `attack.reconstruct` on it, under the same thread policy
  (`fedsim.threads`) a job gets.

Both alone, and as 2 jobs at once: a 2-job parallel sweep (`fedsim -m hydra/launcher=parallel ...`, two identical
jobs) against 2 standalone processes at once. The matching loss of both ways is printed: equal values show the
same update went through the same arithmetic. A third column is the standalone time on one thread (the
OMP_NUM_THREADS=1 reference of the thread policy).

    python benchmarks/attack_overhead_bench.py                    # all four, 2 repeats
    python benchmarks/attack_overhead_bench.py --attacks dlg --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COMMON = ["fl.clients=1", "fl.rounds=1", "output.grid_clients=0", "audit=false"]
CASES = {
    # the command: one 32x32 image, sigmoid LeNet, 300 L-BFGS iterations
    "dlg": ["attack=dlg", "attack.iterations=300", "model=lenet", "data=patches", "data.size=32",
            "data.channels=3", "fl.batch_size=1"],
    "inverting": ["attack=inverting", "attack.iterations=200", "model=cnn", "data=patches", "data.size=32",
                  "data.channels=3", "fl.batch_size=1"],
    # a prior of 50 steps (trained once into the benchmark's cache before timing), short stages
    "gismn": ["attack=gismn", "attack.prior_steps=50", "attack.restarts=1", "attack.stage1_iterations=20",
              "attack.stage2_iterations=100", "attack.stage3_iterations=30", "attack.progress=false",
              "attack.train_if_missing=false", "model=cnn", "data=patches", "data.size=32", "data.channels=3",
              "fl.batch_size=1"],
    "spear": ["attack=spear", "model=fc", "data=patches", "data.size=32", "data.channels=3", "fl.batch_size=8"],
}


def env(cache: Path, threads_one: bool = False) -> dict:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0", "HF_DATASETS_OFFLINE": "1",
         "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FEDSIM_CACHE": str(cache)}
    if threads_one:
        e["OMP_NUM_THREADS"] = "1"
    return e


# --- standalone: one process, one attack on the client's update ---------------------------------------------------

def standalone(case: str, jobs: int) -> dict:
    """Runs in a fresh process: the thread policy as the CLI applies it, then the attack alone."""
    from fedsim.threads import prepare_process

    prepare_process()  # before torch, as the CLI
    import torch
    from omegaconf import OmegaConf

    from fedsim.attacks.base import build_attack
    from fedsim.api import compose
    from fedsim.config import validate
    from fedsim.data import load_dataset
    from fedsim.data.partition import partition
    from fedsim.hook import ThreatModel
    from fedsim.models import build_model
    from fedsim.threads import resolve, using
    from fedsim.threat import Observation, Optimizer, TrainMeta
    from fedsim.training import local_update, seed_for, single_thread

    run = validate(OmegaConf.to_container(compose([*CASES[case], *COMMON]), resolve=True), deep=False)
    fl = run.fl
    bundle = load_dataset(run.data)
    parts = [torch.as_tensor(p) for p in partition(bundle.train_y, fl.clients, run.partition, run.seed)]
    x, y = bundle.train_x[parts[0]], bundle.train_y[parts[0]]
    model = build_model(run.model, bundle.input_shape, bundle.num_classes, run.seed)  # the server's global model
    client = copy.deepcopy(model)
    with single_thread():  # as the client trains
        result = local_update(client, x, y, mode=fl.mode, batch_size=fl.batch_size, local_steps=fl.local_steps,
                              lr=fl.lr, gen=torch.Generator().manual_seed(seed_for(run.seed, 1, 0)))
    params = {name for name, _ in model.named_parameters()}
    update = {k: torch.from_numpy(v.numpy().copy()) for k, v in result.arrays.items() if k in params}
    threat = ThreatModel(mode=fl.mode, batch_size=fl.batch_size, local_steps=fl.local_steps, lr=fl.lr,
                         input_shape=bundle.input_shape, num_classes=bundle.num_classes,
                         normalization=bundle.normalization)
    steps, distinct = threat.training(fl.mode, fl.batch_size, result.num_examples)
    meta = TrainMeta(mode=fl.mode, input_shape=bundle.input_shape, num_classes=bundle.num_classes,
                     normalization=bundle.normalization, batch_size=fl.batch_size, local_steps=steps, lr=fl.lr,
                     num_examples=result.num_examples, distinct_samples=distinct,
                     optimizer=Optimizer(threat.optimizer, threat.momentum, threat.weight_decay))
    model.eval()
    attack = build_attack(run.attack)
    with using(resolve(run.threads, jobs)) as plan:
        obs = Observation(1, 0, copy.deepcopy(model), update, meta, {})
        start = time.perf_counter()
        recon = attack.reconstruct(obs)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "matching_loss": recon.matching_loss, "threads": plan.threads}


def run_standalone(case: str, jobs: int, cache: Path, *, copies: int = 1, threads_one: bool = False) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, __file__, "--standalone", case, "--jobs", str(jobs)],
                              env=env(cache, threads_one), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(copies)]
    rows = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"standalone {case} failed: {err[-2000:]}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


# --- in the federation: the fedsim CLI ----------------------------------------------------------------------------

def run_federated(case: str, cache: Path, *, parallel: bool, threads_one: bool = False) -> tuple[list[dict], float]:
    with tempfile.TemporaryDirectory(prefix="fedsim-overhead-") as out:
        args = [sys.executable, "-m", "fedsim.cli"]
        if parallel:  # two identical jobs (the sweep key changes no computation)
            args += ["-m", "hydra/launcher=parallel", "metrics.recovered_ssim=0.9,0.91", f"hydra.sweep.dir={out}"]
        else:
            args += [f"hydra.run.dir={out}"]
        args += [*CASES[case], *COMMON]
        start = time.perf_counter()
        done = subprocess.run(args, env=env(cache, threads_one), cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"fedsim {case} failed: {done.stderr[-2000:]}")
        files = sorted(Path(out).glob("*/results.jsonl")) if parallel else [Path(out) / "results.jsonl"]
        rows = []
        for f in files:
            threads = json.loads((f.parent / "status.json").read_text()).get("torch_threads")
            for line in f.read_text().splitlines():
                row = json.loads(line)
                if row.get("kind") == "attack":
                    rows.append({"seconds": row["seconds"], "matching_loss": row["matching_loss"],
                                 "threads": threads})
        if len(rows) != (2 if parallel else 1):
            raise RuntimeError(f"fedsim {case}: expected {'2 jobs' if parallel else '1 run'}, got {rows}")
        return rows, wall


def prepare_prior(cache: Path) -> None:
    """The GI-SMN case's prior, trained once before any timing."""
    code = ("from fedsim.attacks.prior import PriorConfig, prior_path, train_and_cache\n"
            f"c = PriorConfig(steps=50)\nimport pathlib\n"
            f"p = prior_path(c, {str(cache / 'priors')!r})\n"
            f"pathlib.Path(p).exists() or train_and_cache(c, {str(cache / 'priors')!r}, progress=False)\n")
    subprocess.run([sys.executable, "-c", code], env=env(cache), cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all measurements, interleaved")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fedsim-overhead-cache")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--standalone", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.standalone:
        print(json.dumps(standalone(args.standalone, args.jobs)))
        return
    if "gismn" in args.attacks:
        prepare_prior(args.cache)
    loads = [os.getloadavg()[0]]
    results: dict[str, dict[str, list]] = {case: {} for case in args.attacks}
    for _ in range(args.repeats):
        for case in args.attacks:
            r = results[case]
            r.setdefault("standalone_1thread", []).extend(run_standalone(case, 1, args.cache, threads_one=True))
            r.setdefault("standalone", []).extend(run_standalone(case, 1, args.cache))
            rows, wall = run_federated(case, args.cache, parallel=False)
            r.setdefault("federated", []).extend(rows)
            r.setdefault("federated_wall", []).append(wall)
            r.setdefault("standalone_x2", []).extend(run_standalone(case, 2, args.cache, copies=2))
            rows, wall = run_federated(case, args.cache, parallel=True)
            r.setdefault("federated_x2", []).extend(rows)
            r.setdefault("federated_x2_wall", []).append(wall)
            loads.append(os.getloadavg()[0])
            print(json.dumps({case: r}), file=sys.stderr, flush=True)
    med = lambda rows: statistics.median(row["seconds"] for row in rows)  # noqa: E731
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; load average (1 min) "
          f"{min(loads):.1f}-{max(loads):.1f}; repeats={args.repeats}; medians of attack seconds")
    print("| attack | 1 thread alone | standalone alone | in federation alone | ratio | standalone x2 | "
          "in sweep x2 | ratio | matching loss (standalone / federated) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, r in results.items():
        sa, fa, s2, f2 = (med(r[k]) for k in ("standalone", "federated", "standalone_x2", "federated_x2"))
        losses = f"{r['standalone'][0]['matching_loss']:.6g} / {r['federated'][0]['matching_loss']:.6g}"
        print(f"| {case} | {med(r['standalone_1thread']):.2f} s | {sa:.2f} s ({r['standalone'][0]['threads']} thr) "
              f"| {fa:.2f} s ({r['federated'][0]['threads']} thr) | {fa / sa:.2f}x "
              f"| {s2:.2f} s ({r['standalone_x2'][0]['threads']} thr) "
              f"| {f2:.2f} s ({r['federated_x2'][0]['threads']} thr) "
              f"| {f2 / s2:.2f}x | {losses} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "load": loads, "cpus": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
