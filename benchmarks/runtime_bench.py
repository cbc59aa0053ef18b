"""Per-round wall time of the same federation on `inline` and `ray`, against a bare PyTorch loop.

The bare loop does the same work with no federation: for every client the same local training (fedsim.training
.local_update on the same partition, seeded the same way, one torch thread), then FedAvg and the server's test
evaluation, in one process with one model object. The federation adds messages, records, the curious hook (one
attacked client, no audit: the hook's attack cost is not what this measures) and, on Ray, actors.

    python benchmarks/runtime_bench.py                          # 10, 100, 1000 clients; inline, ray; bare
    python benchmarks/runtime_bench.py --clients 100 --runtimes inline --rounds 5
    python benchmarks/runtime_bench.py --clock cpu --clients 100 --runtimes inline --rounds 6   # busy machine

Per-round times are medians over rounds 2.. of every repeat (round 1 includes Ray's actor start-up and first-touch
costs; it is reported apart). A federated round's time is rounds.jsonl's `seconds` (configure, train, hook,
aggregate, evaluate) minus the attack's own compute recorded in results.jsonl. With --clock cpu (bare and inline):
this process's CPU time instead of wall time, which leaves out the waits for a core on a machine busy with other
work. Prints a Markdown table; --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SAMPLES_PER_CLIENT = 32


def overrides(clients: int, rounds: int) -> list[str]:
    """fedsim's default small model (MLP 64-256-256-10, 85k weights), one local epoch per round: 4 SGD steps of 8
    samples over the client's 32 samples of 64 features."""
    return ["data=synthetic", f"data.train_size={SAMPLES_PER_CLIENT * clients}", "data.test_size=500",
            "model=fc", "model.widths=[256,256]", "fl.mode=fedavg", "fl.local_steps=4", "fl.batch_size=8", "fl.lr=0.1",
            f"fl.clients={clients}", f"fl.rounds={rounds}", "attack=analytic", "attack.targets=1", "audit=false",
            "output.grid_clients=0"]


def bare_rounds(clients: int, rounds: int) -> list[float]:
    """Seconds per round of the same training without Flower."""
    import torch

    from fedsim.api import compose
    from fedsim.config import validate
    from fedsim.data import load_dataset
    from fedsim.data.partition import partition
    from fedsim.models import build_model
    from fedsim.training import evaluate, local_update, seed_for, single_thread
    from omegaconf import OmegaConf

    run = validate(OmegaConf.to_container(compose(overrides(clients, rounds)), resolve=True), deep=False)
    fl = run.fl
    bundle = load_dataset(run.data)
    parts = [torch.as_tensor(p) for p in partition(bundle.train_y, clients, run.partition, run.seed)]
    data = [(bundle.train_x[p], bundle.train_y[p]) for p in parts]
    model = build_model(run.model, bundle.input_shape, bundle.num_classes, run.seed)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, bundle.test_x, bundle.test_y)
    times = []
    for server_round in range(1, rounds + 1):
        start = _clock()
        with single_thread():  # as the clients train
            total, weighted = 0, {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
            for pid, (x, y) in enumerate(data):
                model.load_state_dict(global_state)
                gen = torch.Generator().manual_seed(seed_for(run.seed, server_round, pid))
                result = local_update(model, x, y, mode=fl.mode, batch_size=fl.batch_size,
                                      local_steps=fl.local_steps, lr=fl.lr, gen=gen)
                total += result.num_examples
                for k, v in result.arrays.items():
                    weighted[k] += result.num_examples * v.double()
            global_state = {k: (v / total).to(global_state[k].dtype) for k, v in weighted.items()}
            model.load_state_dict(global_state)
        evaluate(model, bundle.test_x, bundle.test_y)
        times.append(_clock() - start)
    return times


CLOCK = "wall"


def _clock() -> float:
    """Wall time, or with --clock cpu this process's CPU time (all its threads): on a machine busy with other
    work, CPU time does not count the waits for a core, which inflate wall times by 2-3x at random."""
    return time.process_time() if CLOCK == "cpu" else time.perf_counter()


def federated_rounds(runtime: str, clients: int, rounds: int, extra: list[str]) -> tuple[list[float], float]:
    """Seconds per round (from rounds.jsonl) and the whole run's wall time. With --clock cpu (inline only): the
    process's CPU time of a run of `rounds` rounds minus that of a run of 1 round, per later round (reported as
    every warm round's time; round 1 as the 1-round run's total)."""
    from fedsim.api import run

    if CLOCK == "cpu":
        if runtime != "inline":
            raise SystemExit("--clock cpu measures in-process runtimes only (inline)")
        cpu = {}
        with tempfile.TemporaryDirectory(prefix="fedsim-bench-") as out:  # imports and first-touch costs, apart
            run([*overrides(2, 1), f"runtime={runtime}", *extra], Path(out) / "run")
        for r in (1, rounds):
            with tempfile.TemporaryDirectory(prefix="fedsim-bench-") as out:
                start = time.process_time()
                result = run([*overrides(clients, r), f"runtime={runtime}", *extra], Path(out) / "run")
                cpu[r] = time.process_time() - start
                cpu[r] -= sum(row["seconds"] for row in result.attacks())  # the attack's own (1 thread, ~wall)
        warm = (cpu[rounds] - cpu[1]) / (rounds - 1)
        return [cpu[1]] + [warm] * (rounds - 1), cpu[rounds]

    with tempfile.TemporaryDirectory(prefix="fedsim-bench-") as out:
        start = time.perf_counter()
        result = run([*overrides(clients, rounds), f"runtime={runtime}", *extra], Path(out) / "run")
        wall = time.perf_counter() - start
        if result.status.get("state") != "complete":
            raise RuntimeError(f"{runtime} with {clients} clients: {result.status}")
        attack = {}  # the attack's own compute on the one attacked client is not the runtime's
        for row in result.attacks():
            attack[row["round"]] = attack.get(row["round"], 0.0) + row["seconds"]
        return [row["seconds"] - attack.get(row["round"], 0.0) for row in result.rounds if row["round"] >= 1], wall


def summary(runs: list[list[float]]) -> dict:
    """Round 1 of the first run; the median of rounds 2.. over all runs ("warm")."""
    warm = [t for times in runs for t in (times[1:] or times)]
    return {"first": runs[0][0], "warm": statistics.median(warm), "best": min(warm), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--runtimes", nargs="+", default=["inline", "ray"], choices=["inline", "ray"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, interleaved (the machine's load drifts)")
    parser.add_argument("--ray", nargs="*", default=["runtime.cpus=2", "runtime.client_cpus=1"],
                        help="overrides for the ray runtime")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of this process (clients train on one thread on every runtime; on a "
                             "shared machine more threads mostly measure contention)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (inline and bare only; a busy machine's waits "
                             "for a core left out)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = args.clock
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

    import torch

    from fedsim.runtime import quiet_flower

    torch.set_num_threads(args.threads)
    quiet_flower(False)
    loads = [os.getloadavg()[0]]
    rows = []
    for clients in args.clients:
        times: dict[str, list[list[float]]] = {"bare": []}
        walls: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            times["bare"].append(bare_rounds(clients, args.rounds))
            for runtime in args.runtimes:
                t, wall = federated_rounds(runtime, clients, args.rounds, args.ray if runtime == "ray" else [])
                times.setdefault(runtime, []).append(t)
                walls.setdefault(runtime, []).append(wall)
            loads.append(os.getloadavg()[0])
        row = {"clients": clients, "bare": summary(times["bare"])}
        for runtime in args.runtimes:
            row[runtime] = {**summary(times[runtime]), "wall": walls[runtime]}
            row[runtime]["ratio"] = row[runtime]["warm"] / row["bare"]["warm"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}, clock {CLOCK}; "
          f"load average (1 min) {min(loads):.1f}-{max(loads):.1f}; rounds={args.rounds}, repeats={args.repeats}")
    header = "| clients | bare loop | " + " | ".join(f"{r} round 1 | {r} warm | {r} / bare" for r in args.runtimes)
    print(header + " |")
    print("|" + "---|" * (2 + 3 * len(args.runtimes)))
    for row in rows:
        cells = [str(row["clients"]), _ms(row["bare"]["warm"])]
        for r in args.runtimes:
            cells += [_ms(row[r]["first"]), _ms(row[r]["warm"]), f"{row[r]['ratio']:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "rounds": args.rounds, "repeats": args.repeats, "clock": CLOCK,
                                         "threads": args.threads, "cpus": os.cpu_count(), "load": loads}, indent=1))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


if __name__ == "__main__":
    main()
