"""Benchmark of the defenses inside the federation: privacy and utility side by side, per defense and strength.

    PYTHONPATH=. python benchmarks/defenses_bench.py                  # every cell (about an hour on 2 busy cores)
    PYTHONPATH=. python benchmarks/defenses_bench.py --quick          # fewer rounds, clients and iterations
    PYTHONPATH=. python benchmarks/defenses_bench.py --part threshold # SPEAR against the Gaussian noise scale
    PYTHONPATH=. python benchmarks/defenses_bench.py --part keylock   # every key-lock attacker, several clients

Every number comes from a real fedsim federation (inline runtime, FedSGD, digits 8x8, 4 clients, seed 0):

- SPEAR: `model=fc` (widths 256, 256), batch 8, one round; `exact` = fraction of each client's batch recovered
  with relative error <= 1e-3, averaged over the attacked clients. Key-lock cells run `attack=keylock_spear` (plain
  SPEAR refuses the locked model); secure aggregation attacks the one aggregate of all clients (batch 32).
- Inverting Gradients: DLG's sigmoid `lenet`, batch 1, one round, `attack=inverting` with 1000 iterations and no
  TV (on 8x8 digits TV only hurts), clients 0 and 1; PSNR (dB) and SSIM in pixel space. Key-lock's `adaptive` and
  `regress_key` attackers use `attack=keylock_inversion` (the same recipe with the lock's unknowns optimised).
- Accuracy: `model=fc` (256, 256), batch 8, FedSGD lr 0.5, 40 rounds; the global model's final test accuracy
  (key-lock: `client_accuracy`, each client with its own key; `accuracy` is then the server's random key).

The defense acts on what the client sends: the gradient (FedSGD). Noise: clip C = 1 (the clean gradients have norm
1.4 (fc) and 3.2 (lenet)), std sigma * C per coordinate. Results go to the "Defenses" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.errors import AttackNotApplicable, ConfigError  # noqa: E402

SECTION = "## Defenses: privacy and utility"
FEDERATION = ["data=digits", "fl.clients=4", "fl.mode=fedsgd", "seed=0", "output.grid_clients=0"]
SPEAR = ["model=fc", "model.widths=[256,256]", "fl.batch_size=8", "fl.rounds=1", "attack=spear"]
IG = ["model=lenet", "fl.batch_size=1", "fl.rounds=1", "attack=inverting", "attack.iterations=1000",
      "attack.tv_weight=0", "attack.targets=[0,1]"]
ACCURACY = ["model=fc", "model.widths=[256,256]", "fl.batch_size=8", "fl.lr=0.5", "fl.rounds=40",
            "attack=keylock_inversion", "attack.iterations=1", "attack.targets=1"]


SETUP = """Every number comes from a fedsim federation (inline runtime, FedSGD, digits 8x8, 4 IID clients, seed 0). The
defense acts on what each client sends, its gradient. SPEAR: `model=fc` (256, 256), batch 8, one round, all 4
clients, SPEAR's own counted budget (20 million sampled row families; key-lock rows: `attack=keylock_spear`, the
same) unless the command says otherwise; `exact` = fraction of the batch recovered with relative
error <= 1e-3; "SPEAR stopped" counts the attacked clients by `stop_reason` (certified; converged: no certificate
could come (a noisy gradient, or a key-lock layer without its key), more search changed nothing; noise: the batch's
weakest directions are below the noise; samples or seconds: out of budget, marked "out of budget"). IG: DLG's
sigmoid `lenet`, batch 1, one round, clients 0 and 1, 1000 iterations, no TV;
key-lock's `regress_key` and `adaptive` rows run `attack=keylock_inversion` (the same recipe with the lock's unknowns
optimised). Accuracy: `model=fc` (256, 256), batch 8, lr 0.5, 40 rounds, final global test accuracy (key-lock: the
clients' own-key `client_accuracy`). Noise: clip C = 1 (clean gradient norms: 1.4 fc, 3.2 lenet), std sigma * C per
coordinate; epsilon at delta = 1e-5 after the 40 accuracy rounds, full participation, against the curious server:
replace-one, no amplification (`defenses/noise.py`). Secure aggregation: attacks see one aggregate per round
(SPEAR: batch 32; IG: batch 4)."""


@dataclass
class Cell:
    """One defense at one strength: its overrides, and per column extra overrides (None: not measured)."""

    label: str
    defense: list[str]
    spear: list[str] | None = field(default_factory=list)
    ig: list[str] | None = field(default_factory=list)
    accuracy: list[str] | None = field(default_factory=list)


def cells(quick: bool) -> list[Cell]:
    noise = [1e-6, 1e-5, 3e-5, 1e-4, 1e-2, 1.0] if not quick else [1e-4, 1e-2, 1.0]
    keylock_spear = ["attack=keylock_spear"]
    out = [Cell("none", ["defense=none"])]
    out += [Cell(f"noise gaussian C=1 sigma={s:g}", ["defense=noise", "defense.clip=1.0", f"defense.sigma={s}"])
            for s in noise]
    out += [Cell(f"noise laplace C=1 b={s:g}", ["defense=noise", "defense.mechanism=laplace", "defense.clip=1.0",
                                                f"defense.sigma={s}"]) for s in ([1e-4, 1e-2] if not quick else [1e-2])]
    out += [Cell("clip C=0.1", ["defense=clip", "defense.clip=0.1"])]
    out += [Cell(f"pruning keep={k:g}", ["defense=pruning", f"defense.keep={k}"])
            for k in ([0.9, 0.5, 0.1, 0.01] if not quick else [0.5, 0.1])]
    out += [
        Cell("keylock batch no_key", ["defense=keylock"], spear=keylock_spear),
        Cell("keylock batch known_key", ["defense=keylock", "defense.attacker=known_key"], spear=keylock_spear,
             accuracy=None),
        Cell("keylock batch regress_key", ["defense=keylock", "defense.attacker=regress_key"], spear=None,
             ig=["attack=keylock_inversion"], accuracy=None),
        Cell("keylock batch adaptive", ["defense=keylock", "defense.attacker=adaptive"], spear=None,
             ig=["attack=keylock_inversion"], accuracy=None),
        Cell("keylock running no_key (lock ignored)", ["defense=keylock", "defense.norm=running"],
             spear=keylock_spear + ["attack.ignore_lock=true"]),
        Cell("keylock running known_key", ["defense=keylock", "defense.norm=running", "defense.attacker=known_key"],
             spear=keylock_spear, accuracy=None),
        Cell("secagg (4 clients)", ["defense=secagg"]),
        Cell("stack pruning 0.1 + noise sigma=1e-4", ["defense=stack", "defense.steps=[{name: pruning, keep: 0.1},"
                                                      "{name: noise, clip: 1.0, sigma: 0.0001}]"]),
    ]
    return out


def run_cell(overrides: list[str], out: Path) -> tuple[dict | None, str | None]:
    """Run one federation; (summary, None), or (None, the reason it was refused)."""
    from fedsim.api import run

    try:
        result = run(overrides, out)
    except (AttackNotApplicable, ConfigError) as err:
        return None, f"{type(err).__name__}: {err}"
    attacks = [a for a in result.attacks() if a.get("error") is None]
    errors = [a["error"] for a in result.attacks() if a.get("error")]
    mean = lambda key: statistics.fmean([a[key] for a in attacks if a.get(key) is not None]) \
        if any(a.get(key) is not None for a in attacks) else None  # noqa: E731
    last = result.rounds[-1] if result.rounds else {}
    return {
        "exact": mean("exact"), "psnr": mean("psnr"), "ssim": mean("ssim"), "attacks": len(attacks),
        "certified": mean("certified"), "errors": errors[:2],
        "accuracy": last.get("client_accuracy", last.get("accuracy")), "server_accuracy": last.get("accuracy"),
        "epsilon": last.get("epsilon"), "privacy": last.get("privacy"),
        "seconds": statistics.fmean([a["seconds"] for a in attacks]) if attacks else None,
        # why each search stopped, and how many ran out of their budget (the verdict is then the budget's)
        "stops": dict(collections.Counter(str(a.get("stats", {}).get("stop_reason")) for a in attacks
                                          if a.get("stats", {}).get("stop_reason"))),
        "out_of_budget": sum(bool(a.get("stats", {}).get("budget_exhausted")) for a in attacks),
    }, None


def bench(args) -> list[dict]:
    rows = []
    quick = args.quick
    for cell in cells(quick):
        if args.only and not any(s in cell.label for s in args.only.split(",")):
            continue
        row = {"defense": cell.label}
        with tempfile.TemporaryDirectory() as tmp:
            for column, base, extra in (("spear", SPEAR, cell.spear), ("ig", IG, cell.ig),
                                        ("accuracy", ACCURACY, cell.accuracy)):
                if extra is None or column not in args.columns:
                    continue
                overrides = FEDERATION + base + cell.defense + extra
                if column == "spear":
                    overrides += spear_budget(args)
                if column == "accuracy" and quick:
                    overrides += ["fl.rounds=15"]
                if column == "ig" and quick:
                    overrides += ["attack.iterations=400", "attack.targets=[0]"]
                started = time.perf_counter()
                summary, refused = run_cell(overrides, Path(tmp) / column)
                row[column] = summary if summary is not None else {"refused": refused}
                row[column]["wall"] = round(time.perf_counter() - started, 1)
                print(json.dumps({"defense": cell.label, column: row[column]}), flush=True)
        rows.append(row)
    return rows


def threshold(args) -> list[dict]:
    """SPEAR's exact rate against the Gaussian noise scale (clip 1), every client of two rounds."""
    sigmas = [0.0, 1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4] if not args.quick else [0.0, 1e-6, 1e-5, 1e-4]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sigma in sigmas:
            defense = ["defense=noise", "defense.clip=1.0", f"defense.sigma={sigma}"] if sigma else ["defense=none"]
            summary, refused = run_cell(FEDERATION + SPEAR + defense + ["fl.rounds=2", *spear_budget(args)],
                                        Path(tmp) / str(sigma))
            rows.append({"sigma": sigma, **(summary or {"refused": refused})})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def keylock_study(args) -> list[dict]:
    """Every key-lock attacker with Inverting Gradients' recipe on the locked LeNet, several clients."""
    rows = []
    clients = "[0,1,2,3]" if not args.quick else "[0,1]"
    with tempfile.TemporaryDirectory() as tmp:
        for norm in ("batch", "running"):
            for attacker, attack in (("no_key", "inverting"), ("known_key", "inverting"),
                                     ("regress_key", "keylock_inversion"), ("adaptive", "keylock_inversion")):
                overrides = (FEDERATION + IG + ["defense=keylock", f"defense.norm={norm}",
                                                f"defense.attacker={attacker}", f"attack={attack}",
                                                f"attack.targets={clients}"])
                summary, refused = run_cell(overrides, Path(tmp) / f"{norm}-{attacker}")
                rows.append({"norm": norm, "attacker": attacker, "attack": attack, **(summary or {"refused": refused})})
                print(json.dumps(rows[-1]), flush=True)
    return rows


# --- the report --------------------------------------------------------------------------------------------------

def spear_budget(args) -> list[str]:
    """SPEAR's budget overrides: none by default (the attack's own counted budget and safety net)."""
    return ([f"attack.max_samples={args.spear_samples}"] if args.spear_samples is not None else []) + \
           ([f"attack.max_seconds={args.spear_seconds}"] if args.spear_seconds is not None else [])


def stopped(spear: dict) -> str:
    """'certified 4', 'converged 3, seconds 1 (1 out of budget)': why the attacked clients' searches ended."""
    stops = spear.get("stops") or {}
    text = ", ".join(f"{reason} {n}" for reason, n in sorted(stops.items())) or "-"
    return text + (f" ({spear['out_of_budget']} out of budget)" if spear.get("out_of_budget") else "")


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    lines = ["| defense | SPEAR exact | SPEAR certified | SPEAR stopped | IG PSNR dB | IG SSIM | final accuracy "
             "| epsilon (40 rounds) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s, ig, acc = row.get("spear", {}), row.get("ig", {}), row.get("accuracy", {})
        spear = "refused" if "refused" in s else fmt(s.get("exact"), ".2f")
        lines.append(f"| {row['defense']} | {spear} | {fmt(s.get('certified'), '.2f')} | {stopped(s)} | "
                     f"{'refused' if 'refused' in ig else fmt(ig.get('psnr'), '.1f')} | {fmt(ig.get('ssim'), '.3f')} | "
                     f"{fmt(acc.get('accuracy'), '.3f')} | {fmt(acc.get('epsilon'), '.3g')} |")
    return "\n".join(lines)


def write_section(text: str, out: Path) -> None:
    old = out.read_text() if out.exists() else "# Benchmarks\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip() + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + (old[end:] if end >= 0 else "")
    out.write_text(new.rstrip() + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("table", "threshold", "keylock"), default="table")
    parser.add_argument("--columns", default="spear,ig,accuracy")
    parser.add_argument("--only", default="", help="run only cells whose label contains one of these (comma-separated)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--spear-samples", type=int, default=None,
                        help="SPEAR's counted budget per reconstruction (default: the attack's own, 20 million)")
    parser.add_argument("--spear-seconds", type=float, default=None,
                        help="SPEAR's wall-clock safety net (default: the attack's own); a search it stops is "
                             "marked out of budget")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the table into this BENCHMARKS.md")
    parser.add_argument("--render", type=Path, default=None, help="write the table of an earlier --json, no runs")
    parser.add_argument("--command", default=None, help="with --render: the command that produced the JSON")
    parser.add_argument("--minutes", type=float, default=None, help="with --render: how long it ran")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.render:
        rows, minutes = json.loads(args.render.read_text()), args.minutes or 0.0
    else:
        rows = {"table": bench, "threshold": threshold, "keylock": keylock_study}[args.part](args)
        minutes = (time.perf_counter() - started) / 60
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.out and args.part == "table":
        command = args.command or ("PYTHONPATH=. python benchmarks/defenses_bench.py " + " ".join(argv or sys.argv[1:]))
        header = (f"{SECTION}\n\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"torch {torch.__version__}, {args.threads} intra-op thread(s). Command: `{command.strip()}` "
                  f"({minutes:.0f} min).\n\n{SETUP}\n")
        write_section(header + "\n" + table(rows) + "\n", args.out)
    print(f"done in {minutes:.1f} min")


if __name__ == "__main__":
    main()
