"""`fedsim-report PATH`: one run or a whole sweep -> a tidy table, plots, reconstruction grids and one HTML page.

    fedsim-report multirun/spear_vs_defenses/small          # writes .../small/report/index.html
    fedsim-report --markdown multirun/spear_vs_defenses/small   # prints the study table as Markdown (README's)

PATH may be a run directory, a multirun directory, or any folder holding either: every directory below it with a
`status.json` (or a `.hydra/` left by a job that died before starting) is one job. The report goes to
`PATH/report/` (or `--out`):

    table.csv, table.parquet   tidy: one row per run x round x client x attack, keyed by the overrides that
                               define the job (from its .hydra/overrides.yaml) plus round, client and attack
    runs.csv                   one row per job: its status, overrides, final accuracy, mean attack success
    table.md                   the study table (one row per job: identified, exact, PSNR, SSIM, final accuracy)
    plots/*.png                attack success per round, against defense strength, the privacy-utility frontier,
                               and against any other swept number (batch size, width, ...)
    grids/<job>/*.png          each job's reconstruction grids (originals above reconstructions)
    index.html                 all of it on one static page, readable offline

A job's status is one of: complete; running (its process is alive on this machine); incomplete (it stopped
without finishing: killed, interrupted, or never started); failed (it raised); invalid (its config was refused).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from fedsim.console import study_markdown
from fedsim.metrics import HEADLINE_METRICS, SCORE_COLUMNS
from fedsim.page import render_page
from fedsim.plots import make_plots
from fedsim.results import (
    CONFIG_FILE,
    GRID_DIR,
    RESULTS_FILE,
    ROUNDS_FILE,
    STATUS_FILE,
    read_jsonl,
    read_status,
    run_state,
)

REPORT_DIR = "report"
STATUSES = ("complete", "running", "incomplete", "failed", "invalid")
# Columns of results.jsonl attack rows that describe the record itself rather than measure the attack.
RECORD_KEYS = ("attack", "defense", "seed", "mode", "batch_size", "round", "client")
METRICS = SCORE_COLUMNS + ("certified", "returned", "matching_loss", "seconds", "error")
ROUND_FIXED = ("round", "seconds", "faults", "defense", "seed", "mode", "batch_size", "skipped", "sent",
               "received", "healthy")


@dataclass
class Job:
    """One run directory as found on disk."""

    directory: Path
    name: str                                   # path relative to the collected root
    status: str                                 # one of STATUSES
    overrides: dict[str, Any] = field(default_factory=dict)   # key -> value, in the order given
    config: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)   # status.json
    results: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)

    @property
    def error(self) -> str | None:
        return self.state.get("error")

    @property
    def grids(self) -> list[Path]:
        folder = self.directory / GRID_DIR
        return sorted(folder.glob("*.png")) if folder.is_dir() else []


# --- finding and reading jobs --------------------------------------------------------------------------------------

def find_job_dirs(root: str | os.PathLike) -> list[Path]:
    """Every run directory at or below `root` (the report's own output is skipped)."""
    root = Path(root)
    found = []
    for current, dirs, files in os.walk(root):
        here = Path(current)
        dirs[:] = sorted(d for d in dirs if d not in (REPORT_DIR, ".hydra", GRID_DIR) and not d.startswith("."))
        if STATUS_FILE in files or (here / ".hydra" / "overrides.yaml").exists():
            found.append(here)
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list:
    """Sort job 10 after job 9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def status_label(directory: Path) -> str:
    """complete / running / incomplete / failed / invalid (`fedsim.results.run_state`, with a run that was
    interrupted or never started counted as incomplete)."""
    state = run_state(directory)
    return "incomplete" if state in ("interrupted", "missing") else state


def parse_overrides(lines: list[str]) -> dict[str, Any]:
    """Hydra override strings -> {key: value}, values typed by Hydra's grammar (`defense.sigma=1e-3` -> 0.001).

    Keys lose their `+`/`++` prefix; deletions (`~key`) and Hydra's own keys are left out; lists and dicts keep
    the text after `=` (e.g. `model.widths` -> "[64,64]").
    """
    parser = OverridesParser.create()
    out: dict[str, Any] = {}
    for line in lines:
        try:
            override = parser.parse_override(line)
        except Exception:  # noqa: BLE001 - a line Hydra cannot parse is kept as text
            key, _, value = line.lstrip("+~").partition("=")
            out[key] = value
            continue
        key = override.key_or_group
        if override.is_delete() or key.startswith("hydra") or override.is_sweep_override():
            continue
        value = override.value()
        if isinstance(value, (list, dict)) or value is None and override.get_value_element_as_str() != "null":
            value = override.get_value_element_as_str()
        out[key] = value
    return out


def read_job(directory: Path, root: Path) -> Job:
    state = read_status(directory)
    overrides_path = directory / ".hydra" / "overrides.yaml"
    overrides = parse_overrides(yaml.safe_load(overrides_path.read_text()) or []) if overrides_path.exists() else {}
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        config_path = directory / ".hydra" / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text()) or {} if config_path.exists() else {}
    except yaml.YAMLError:
        config = {}
    name = directory.relative_to(root).as_posix() if directory != root else directory.name
    return Job(directory, name, status_label(directory), overrides, config, state,
               read_jsonl(directory / RESULTS_FILE), read_jsonl(directory / ROUNDS_FILE))


def collect(root: str | os.PathLike) -> list[Job]:
    """Every job under `root`. Runs made without Hydra (`fedsim.api.run`) have no overrides file: their keys are
    the config values that differ between them (e.g. `defense.sigma` across a notebook's loop)."""
    root = Path(root).resolve()
    jobs = [read_job(d, root) for d in find_job_dirs(root)]
    bare = [j for j in jobs if not (j.directory / ".hydra" / "overrides.yaml").exists() and j.config]
    if len(bare) > 1:
        flat = [_flatten(j.config) for j in bare]
        keys = sorted({k for f in flat for k in f})
        varying = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
        for job, values in zip(bare, flat):
            job.overrides = {k: values[k] for k in varying if k in values}
    return jobs


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"defense": {"name": "noise", "sigma": 0.1}} -> {"defense": "noise", "defense.sigma": 0.1} (a group's
    `name` stands for the group, as in an override)."""
    out: dict[str, Any] = {}
    for key, value in (config or {}).items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            for sub, v in _flatten(value, f"{path}.").items():
                out[path if sub == f"{path}.name" else sub] = v
        elif isinstance(value, list):
            out[path] = str(value).replace(" ", "")
        else:
            out[path] = value
    return out


# --- tables ----------------------------------------------------------------------------------------------------------

def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs (all override keys when there is one job)."""
    all_keys = jobs_override_keys(jobs)
    keys: dict[str, set] = {k: set() for k in all_keys}
    for job in jobs:
        for key in all_keys:
            keys[key].add(repr(job.overrides.get(key)))
    if len(jobs) <= 1:
        return list(keys)
    return [k for k, values in keys.items() if len(values) > 1]


def job_label(job: Job, keys: list[str]) -> str:
    """A short name for a job from the overrides that vary in the sweep (seed left out)."""
    parts = [f"{k}={_short(job.overrides[k])}" for k in keys if k in job.overrides and k != "seed"]
    return ", ".join(parts) if parts else job.name


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def tidy_table(jobs: list[Job]):
    """One row per run x round x client x attack (a job without attack records gets one row with its status)."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    keys = swept_keys(jobs)
    rows = []
    for job in jobs:
        final = _final_round(job)
        per_round = {r.get("round"): r for r in job.rounds}
        head = {"run": job.name, "status": job.status, "label": job_label(job, keys)}
        head.update({k: v for k, v in job.overrides.items()})
        attacks = [r for r in job.results if r.get("kind") == "attack"]
        if not attacks:
            rows.append({**head, "error": job.error})
            continue
        for rec in attacks:
            row = dict(head)
            for key, value in rec.items():
                if key in ("kind", "stats"):
                    continue
                row[key] = value
            for key, value in (rec.get("stats") or {}).items():
                if isinstance(value, (int, float, bool, str)) or value is None:
                    row[f"stats.{key}"] = value
            round_row = per_round.get(rec.get("round"), {})
            row["accuracy"] = round_row.get("accuracy")
            row["loss"] = round_row.get("loss")
            for key, value in round_row.items():
                if key not in ROUND_FIXED and key not in ("accuracy", "loss") and not isinstance(value, (dict, list)):
                    row.setdefault(key, value)
            row["final_accuracy"] = final_accuracy(final)
            rows.append(row)
    df = pd.DataFrame(rows)
    if "defense" not in df.columns:  # runs not made by fedsim's own server (CuriousStrategy in a user's app)
        df["defense"] = None
    df = _with_strength(df)
    return _typed(_ordered(df, [k for k in jobs_override_keys(jobs)]))


def jobs_override_keys(jobs: list[Job]) -> list[str]:
    seen: dict[str, None] = {}
    for job in jobs:
        for key in job.overrides:
            seen.setdefault(key, None)
    return list(seen)


def _final_round(job: Job) -> dict:
    done = [r for r in job.rounds if r.get("round", 0) > 0 and r.get("accuracy") is not None]
    return done[-1] if done else {}


def final_accuracy(last_round: dict) -> float | None:
    """The utility of a run: its last round's test accuracy, as the clients get it where that differs from the
    server's (key-lock: clients evaluate with their private keys, `client_accuracy`)."""
    value = last_round.get("client_accuracy")
    return value if isinstance(value, (int, float)) else last_round.get("accuracy")


def _with_strength(df):
    """`strength` / `strength_knob`: the knob of each defense that varies in the sweep (none: 0).

    Candidates are the `defense.<knob>` overrides and the `defense_<knob>` columns the defense reports; the one
    that takes more than one value among that defense's jobs wins (overrides first).
    """
    import pandas as pd  # heavy: pandas loads only when a table is built

    df = df.copy()
    df["strength"] = math.nan
    df["strength_knob"] = pd.Series([None] * len(df), dtype="object")
    if "defense" not in df.columns or df.empty:
        return df
    candidates = [c for c in df.columns if c.startswith("defense.")] + \
                 [c for c in df.columns if c.startswith("defense_")]
    for defense, part in df.groupby("defense", dropna=True):
        if defense == "none":
            df.loc[part.index, "strength"] = 0.0
            continue
        numeric = [c for c in candidates if pd.to_numeric(part[c], errors="coerce").notna().any()]
        varying = [c for c in numeric if part.groupby("run")[c].first().nunique() > 1]
        chosen = (varying or numeric or [None])[0]
        if chosen is None:
            continue
        df.loc[part.index, "strength"] = pd.to_numeric(part[chosen], errors="coerce")
        df.loc[part.index, "strength_knob"] = chosen.replace("defense_", "defense.")
    return df


def _ordered(df, override_keys: list[str]):
    first = ["run", "status", "label"] + [k for k in override_keys if k in df.columns]
    first += [c for c in RECORD_KEYS if c in df.columns and c not in first]
    first += [c for c in ("strength", "strength_knob") if c in df.columns]
    first += [c for c in METRICS if c in df.columns]
    first += [c for c in ("accuracy", "loss", "final_accuracy") if c in df.columns]
    rest = [c for c in df.columns if c not in first]
    return df[first + rest]


def _typed(df):
    """Each column one type, so Parquet can hold it: numbers stay numbers, anything mixed becomes text."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    df = df.copy()
    for col in df.columns:
        values = df[col].dropna()
        if values.empty:
            continue
        if all(isinstance(v, bool) for v in values):
            df[col] = df[col].astype("boolean")
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            df[col] = pd.to_numeric(df[col])
        elif not all(isinstance(v, str) for v in values):
            df[col] = df[col].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    return df


def runs_table(jobs: list[Job], tidy=None):
    """One row per job: status, overrides, rounds done, final accuracy, mean attack success, error."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    tidy = tidy if tidy is not None else tidy_table(jobs)
    keys = swept_keys(jobs)
    rows = []
    for job in jobs:
        row = {"run": job.name, "status": job.status, "label": job_label(job, keys), **job.overrides,
               "rounds_done": job.state.get("rounds_done"), "rounds_total": job.state.get("rounds_total"),
               "final_accuracy": final_accuracy(_final_round(job)),
               "faults": sum(1 for r in job.results if r.get("kind") == "fault")}
        part = tidy[tidy["run"] == job.name] if "run" in tidy.columns else tidy.iloc[0:0]
        for metric in HEADLINE_METRICS + ("label_set_acc", "seconds", "ceiling_psnr"):
            if metric in part.columns:
                values = pd.to_numeric(part[metric], errors="coerce").dropna()
                row[f"mean_{metric}"] = float(values.mean()) if len(values) else None
                if metric == "psnr":  # the spread over clients, rounds (and images, one per client at batch 1)
                    row["std_psnr"] = float(values.std()) if len(values) > 1 else None
        attacked = part[part["attack"].notna()] if "attack" in part.columns else part.iloc[0:0]
        row.update(_first_and_last(attacked))
        final = _final_round(job)
        if isinstance(final.get("epsilon"), (int, float)):
            row["epsilon"] = final["epsilon"]
        raised = attacked["error"].notna() & (attacked["error"].astype(str) != "") if "error" in attacked else []
        row["attacks"], row["attacks_raised"] = len(attacked), int(sum(raised))
        for col in ("defense", "strength", "strength_knob"):
            if col in part.columns and len(part):
                row.setdefault(col, part[col].iloc[0])
        row["error"] = job.error
        rows.append(row)
    runs = pd.DataFrame(rows)
    if "defense" not in runs.columns:
        runs["defense"] = None
    order = runs.assign(_d=runs.get("defense", pd.Series(dtype=object)).astype(str).replace("none", ""),
                        _s=pd.to_numeric(runs.get("strength", pd.Series(dtype=float)), errors="coerce").fillna(-1))
    runs = runs.loc[order.sort_values(["_d", "_s", "label", "run"], kind="stable").index].reset_index(drop=True)
    return _typed(runs)


def _first_and_last(attacked) -> dict[str, Any]:
    """Attack success at the first and the last attacked round of a run (`first_round`, `first_<metric>`, ...):
    a fresh model against the trained one."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    if attacked.empty or "round" not in attacked.columns:
        return {}
    rounds = pd.to_numeric(attacked["round"], errors="coerce").dropna()
    if rounds.empty:
        return {}
    out: dict[str, Any] = {}
    for when, number in (("first", rounds.min()), ("last", rounds.max())):
        part = attacked[pd.to_numeric(attacked["round"], errors="coerce") == number]
        out[f"{when}_round"] = int(number)
        for metric in ("identified", "exact", "psnr", "ssim", "ceiling_psnr"):
            if metric in part.columns:
                values = pd.to_numeric(part[metric], errors="coerce").dropna()
                out[f"{when}_{metric}"] = float(values.mean()) if len(values) else None
    return out


# --- the report ---------------------------------------------------------------------------------------------------------

@dataclass
class Report:
    directory: Path
    page: Path
    jobs: list[Job]
    tidy: Any
    runs: Any
    plots: list[Path]


def write_report(root: str | os.PathLike, out: str | os.PathLike | None = None, *, embed: bool = False,
                 title: str | None = None) -> Report:
    """Collect every job under `root` and write the tables, plots, grids and index.html into `out`."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    jobs = collect(root)
    if not jobs:
        raise FileNotFoundError(f"no fedsim runs under {root} (a run directory holds status.json)")
    out = Path(out).resolve() if out is not None else root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    tidy = tidy_table(jobs)
    runs = runs_table(jobs, tidy)
    tidy.to_csv(out / "table.csv", index=False)
    tidy.to_parquet(out / "table.parquet", index=False)
    runs.to_csv(out / "runs.csv", index=False)
    (out / "table.md").write_text(study_markdown(runs))
    notes: list[str] = []
    plots = make_plots(tidy, runs, out / "plots", notes)
    grids: dict[str, list[Path]] = {}
    grid_root = out / GRID_DIR
    if grid_root.exists():
        shutil.rmtree(grid_root)
    for job in jobs:
        copied = []
        for grid in job.grids:
            target = grid_root / _slug(job.name) / grid.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, target)
            copied.append(target)
        grids[job.name] = copied
    page = render_page(out, title=title or _title(root, jobs), root=root, jobs=jobs, tidy=tidy,
                       runs=runs, plots=plots, grids=grids, embed=embed, notes=notes)
    return Report(out, page, jobs, tidy, runs, plots)


def markdown_table(root: str | os.PathLike) -> str:
    """The study table of every job under `root` as Markdown (what `fedsim-report --markdown` prints)."""
    root = Path(root).resolve()
    jobs = collect(root) if root.is_dir() else []
    if not jobs:
        raise FileNotFoundError(f"no fedsim runs under {root} (a run directory holds status.json)")
    return study_markdown(runs_table(jobs))


def _title(root: Path, jobs: list[Job]) -> str:
    """The study's name and scale when the runs come from a preset, else the folder's name."""
    studies = {(str((j.config.get("study") or {}).get("name")), str((j.config.get("study") or {}).get("scale")))
               for j in jobs if isinstance(j.config.get("study"), dict)}
    if len(studies) == 1:
        name, scale = studies.pop()
        return f"fedsim study: {name} ({scale})"
    return f"fedsim report: {root.name}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "run"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedsim-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a run directory, a multirun directory, or a folder holding them")
    parser.add_argument("--out", help="where to write the report (default: PATH/report)")
    parser.add_argument("--embed", action="store_true",
                        help="embed every image in index.html (one self-contained file)")
    parser.add_argument("--title", help="the page's title")
    parser.add_argument("--markdown", action="store_true",
                        help="only print the study table as Markdown (one row per run), write nothing")
    args = parser.parse_args(argv)
    if args.markdown:
        try:
            print(markdown_table(args.path), end="")
        except FileNotFoundError as err:
            print(f"fedsim-report: {err}", file=sys.stderr)
            return 2
        return 0
    try:
        report = write_report(args.path, args.out, embed=args.embed, title=args.title)
    except FileNotFoundError as err:
        print(f"fedsim-report: {err}", file=sys.stderr)
        return 2
    counts = {s: sum(1 for j in report.jobs if j.status == s) for s in STATUSES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(f"fedsim-report: {len(report.jobs)} run(s): {summary}")
    print(f"table: {report.directory / 'table.csv'} ({len(report.tidy)} rows; also table.parquet, runs.csv)")
    print(f"page:  {report.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
