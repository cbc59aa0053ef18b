"""The report's single static HTML page: status, plots, the per-run table and the reconstruction grids.

Its first screen is a summary a newcomer reads in a minute: one sentence per defense (what leaked at the first and
the last attacked round, the epsilon where the defense has one, the final accuracy and its cost against no
defense, links to the image grids), and key-lock's claim as one table when the study ran key-lock.

No scripts and no remote assets: images are files next to the page (relative links) or, with `embed`, data URIs
inside it, so the page reads offline and can be mailed or archived as it is.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
import re
from pathlib import Path
from typing import Any

from fedsim.metrics import RECOVERED_SSIM
from fedsim.plots import accuracy_by_seed, keylock_summary

CAPTIONS = {
    "attack_per_round": "Attack success against the round, i.e. as the model trains (the rounds the schedule "
                        "attacked, attack.rounds), for each setting of the sweep (mean over clients and seeds). "
                        "identified = fraction of each client's batch whose reconstruction picks out the true "
                        "sample among the client's data; exact = fraction recovered exactly; PSNR in dB (higher: "
                        "closer). Samples an attack did not return count as failures.",
    "attack_vs_strength": "Attack success against each defense's strength (mean over clients; one line per "
                          "attacked round when a run attacked two or three, else the mean over rounds; bars: "
                          "spread over seeds). Dash-dotted: the same attack with no defense.",
    "privacy_utility": "Final test accuracy of the global model against attack success, one point per setting "
                       "(each labelled with its defense and strength). Up and to the left is better; the line is "
                       "the frontier of settings no other setting beats on both.",
    "keylock": "Key-lock's claim: final test accuracy of FedAvg without and with the key-lock block on the same "
               "task and budget (bars: mean over seeds, error bars: standard deviation, dots: seeds), and attack "
               "success for each attacker option at the first (fresh model) and last (trained) attacked round.",
    "sweep": "Attack success and attack time against a swept setting, one line per setting of the other swept keys.",
}

STATUS_COLORS = {"complete": "#2e7d32", "running": "#1565c0", "incomplete": "#ef6c00", "failed": "#c62828",
                 "invalid": "#6a1b9a"}

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1250px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #555; font-size: 0.9em; }
.badge { display: inline-block; padding: 0.05em 0.55em; border-radius: 0.8em; color: white; font-size: 0.85em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; }
th { background: #f5f5f5; } td.text { text-align: left; }
details { margin: 0.6em 0; } summary { cursor: pointer; font-weight: 600; }
.grids { display: flex; flex-wrap: wrap; gap: 0.5em; align-items: flex-start; }
.grids img { max-width: 100%; border: 1px solid #eee; }
.error { color: #c62828; font-size: 0.85em; }
code.cmd { display: block; font-size: 0.8em; color: #333; background: #f7f7f7; padding: 0.3em 0.5em;
           margin: 0.3em 0; overflow-x: auto; white-space: nowrap; }
"""


def render_page(out: Path, *, title: str, root: Path, jobs: list, tidy: Any, runs: Any, plots: list[Path],
                grids: dict[str, list[Path]], embed: bool = False, notes: list[str] = ()) -> Path:
    """Write `out/index.html` and return its path."""
    def src(path: Path) -> str:
        if embed:
            return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        return html.escape(path.relative_to(out).as_posix())

    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    badges = " ".join(_badge(s, f"{n} {s}") for s, n in counts.items())
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='meta'>{html.escape(str(root))}<br>{len(jobs)} run(s): {badges}<br>"
        f"{len(tidy)} rows (run x round x client x attack); generated "
        f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')}</p>",
        "<p class='meta'>Data: <a href='table.csv'>table.csv</a> · <a href='table.parquet'>table.parquet</a> "
        "(tidy, one row per run x round x client x attack) · <a href='runs.csv'>runs.csv</a> (one row per run)</p>",
    ]
    anchors = {job.name: "grids-" + _anchor(job.name) for job in jobs if grids.get(job.name)}
    sentences = summary(runs, anchors, tidy)
    if sentences:
        parts.append("<h2>In one minute</h2><ul class='summary'>" + "".join(f"<li>{x}</li>" for x in sentences)
                     + "</ul>")
    lock = keylock_table(tidy)
    if lock:
        parts.append("<h2>Key-lock: utility and attackers</h2>" + lock)
    lines = findings(tidy)
    if lines:
        parts.append("<h2>Findings</h2><ul class='findings'>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines)
                     + "</ul>")
    if plots or notes:
        parts.append("<h2>Plots</h2>")
        parts += [f"<p class='meta'>{html.escape(n)}</p>" for n in notes]
        for plot in plots:
            kind = "sweep" if plot.stem.startswith("sweep_") else plot.stem
            caption = CAPTIONS.get(kind, "")
            if kind == "sweep":
                caption = f"{plot.stem[len('sweep_'):]}: " + caption
            parts.append(f"<figure id='{html.escape(plot.stem)}'><img class='plot' src='{src(plot)}' "
                         f"alt='{html.escape(plot.stem)}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("<h2>Runs</h2>")
    parts.append(_runs_html(runs))
    with_grids = [job for job in jobs if grids.get(job.name)]
    if with_grids:
        parts.append("<h2>Reconstructions</h2><p class='meta'>Each grid: the client's true batch (top) above what "
                     "the attack recovered, matched sample to sample (bottom, with its PSNR; 'exact' marks exact "
                     "recovery, 'id' a reconstruction that identifies its sample among the client's data).</p>")
        order = {name: i for i, name in enumerate(runs["run"])}
        for i, job in enumerate(sorted(with_grids, key=lambda j: order.get(j.name, 0))):
            label = runs.loc[runs["run"] == job.name, "label"].iloc[0]
            opened = " open" if i < 6 else ""
            images = "".join(f"<img class='grid' src='{src(p)}' alt='{html.escape(p.stem)}'>" for p in grids[job.name])
            anchor = f" id='{anchors[job.name]}'" if job.name in anchors else ""
            parts.append(f"<details{opened}{anchor}><summary>{html.escape(str(label))} {_badge(job.status, job.status)}"
                         f"</summary>{_command(job)}<div class='grids'>{images}</div></details>")
    parts.append("</body></html>")
    page = out / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page


def _command(job: Any) -> str:
    """The command that runs this job alone (its overrides), for a reader who wants to repeat or vary it."""
    if not job.overrides:
        return ""
    args = " ".join(_arg(k, v) for k, v in job.overrides.items())
    return f"<code class='cmd'>fedsim {html.escape(args)}</code>"


def _arg(key: str, value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value).replace(" ", "")
    prefix = "+" if key in ("experiment", "tracking") else ""
    return f"{prefix}{key}={text}"


VERDICTS = ("leaked", "defense held", "attack out of budget", "attack fell short", "not applicable", "failed",
            "no defense")


def verdict(rows: Any, status: str = "complete", error: str | None = None) -> tuple[str, str]:
    """(verdict, reason) for one setting's attack records (tidy rows of one run and attack).

    failed: the run or every attack raised. not applicable: the configuration was refused (the attack cannot run
    on this model or threat model). leaked: some of a batch identified (exact where nothing is identifiable).
    attack out of budget: nothing identified, and the attack stopped at its budget (SPEAR's
    `stats.budget_exhausted`) on some update, so the defense is not shown to hold. attack fell short: nothing
    identified by an attack that ran to its end, but the updates' least-squares ceiling (`fedsim.ceiling`, what an
    attacker with every sample's output gradient gets) is recognisable (SSIM >= the recovered threshold): the attack,
    not the defense, stopped. defense held: nothing identified by an attack that ran to its end, and no ceiling
    says the updates give the images away.
    """
    import pandas as pd  # heavy: pandas loads only when a table is built

    if status == "invalid":
        return "not applicable", f"not run, the configuration was refused: {error or 'no reason recorded'}"
    if status == "failed" and (rows is None or rows.empty):
        return "failed", f"the run raised: {error}" if error else "the run raised"
    if rows is None or rows.empty:
        return "failed", f"no attack was recorded (run {status})"
    errors = rows["error"].dropna() if "error" in rows.columns else rows.iloc[0:0]["attack"]
    errors = errors[errors.astype(str) != ""]
    if len(errors) == len(rows):
        return "failed", f"every attack raised: {str(errors.iloc[0])[:200]}"
    identified = pd.to_numeric(rows.get("identified"), errors="coerce")
    exact = pd.to_numeric(rows.get("exact"), errors="coerce")
    measure, name = (identified, "identified") if identified.notna().any() else (exact, "exact")
    tail = f"; {len(errors)} of {len(rows)} attacks raised (counted as recovering nothing)" if len(errors) else ""
    tail += _ceiling_note(rows)
    if measure.notna().any() and measure.mean() > 0:
        text = f"{name} {measure.mean():.0%}"
        if name == "identified" and exact.notna().any():
            text += f", exact {exact.mean():.0%}"
        return "leaked", text + tail
    if not measure.notna().any():
        return "failed", "no reconstruction was scored (no ground truth, or the attack returns no inputs)"
    budget = rows.get("stats.budget_exhausted")
    exhausted = int(budget.map(_true).sum()) if budget is not None else 0
    if exhausted:
        return "attack out of budget", (f"nothing {name}, but the attack stopped at its budget on {exhausted} of "
                                        f"{len(rows)} updates: inconclusive, not a defense holding" + tail)
    ceiling, used = _numbers(rows, "ceiling_ssim"), _numbers(rows, "recovered_ssim")
    threshold = float(used.iloc[0]) if len(used) else RECOVERED_SSIM
    if len(ceiling) and ceiling.mean() >= threshold:
        return "attack fell short", (f"nothing {name} by the attack, but the updates leave recognisable images to an "
                                     f"attacker with every sample's output gradient (least-squares ceiling SSIM "
                                     f"{ceiling.mean():.2f}): the defense is not shown to hold" + tail)
    return "defense held", f"nothing {name} by an attack that ran to its end" + tail


def _ceiling_note(rows: Any) -> str:
    """'; the update's least-squares ceiling 50.1 dB (attack 42.5 dB)' where records carry it (`fedsim.ceiling`):
    what the updates left to an attacker with every sample's output gradient, so that an attack's shortfall is not
    read as the defense's strength."""
    ceiling, psnr = _numbers(rows, "ceiling_psnr"), _numbers(rows, "psnr")
    if not len(ceiling):
        return ""
    attack = f" (attack {psnr.mean():.1f} dB)" if len(psnr) else ""
    return f"; the updates' least-squares ceiling {ceiling.mean():.1f} dB{attack}"


def _numbers(rows: Any, column: str) -> Any:
    """The numbers in one column of a table (a pandas Series without its blanks; empty when the column is absent)."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    return pd.to_numeric(rows[column], errors="coerce").dropna() if column in rows else pd.Series(dtype=float)


def _true(value: Any) -> bool:
    """A flag read from a table: True, "True" or 1 (missing, pandas' NA included, is not true)."""
    if value is True or (isinstance(value, str) and value == "True"):
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 1


def findings(tidy: Any) -> list[str]:
    """Plain sentences for the top of the page: for each attack and setting, what leaked, or why nothing did
    (defense held, attack out of budget, not applicable, failed); then, for each defense whose strength was swept,
    the identified rate at each strength."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    if tidy.empty or "run" not in tidy.columns:
        return []
    out = []
    df = tidy.copy()
    for col in ("identified", "exact", "psnr", "final_accuracy"):
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df.columns else math.nan
    for run, part in df.groupby("run", sort=False):
        first = part.iloc[0]
        status = str(first.get("status"))
        error = first.get("error") if not _missing(first.get("error")) else None
        attack_rows = part[part["attack"].notna()] if "attack" in part.columns else part.iloc[0:0]
        label = first.get("label", run)
        if attack_rows.empty:
            kind, why = verdict(None, status, error)
            out.append(f"{label}: {kind}: {why}.")
            continue
        for attack, rows in attack_rows.groupby("attack"):
            kind, why = verdict(rows, status, error)
            if kind == "leaked" and first.get("defense") == "none":
                kind = "no defense"
            acc = rows["final_accuracy"].mean()
            tail = f" (final accuracy {acc:.1%})" if acc == acc else ""
            out.append(f"{attack} vs {label}: {kind}: {why}{tail}.")
    if {"attack", "defense", "strength"} <= set(df.columns):
        for attack, part in df[df["attack"].notna()].groupby("attack"):
            measure = "identified" if part["identified"].notna().any() else "exact"
            for defense, runs in part[part["defense"] != "none"].groupby("defense"):
                by = runs.groupby("strength").agg(rate=(measure, "mean"), exact=("exact", "mean"))
                knob = runs["strength_knob"].dropna()
                if len(by) < 2 or knob.empty:
                    continue
                rates = ", ".join(f"{value:g}: {row.rate:.0%}" + (f" (exact {row.exact:.0%})" if measure != "exact"
                                                                  and row.exact == row.exact else "")
                                  for value, row in by.iterrows())
                out.append(f"{attack} against {defense}, {measure} by {knob.iloc[0]}: {rates}.")
    return out


def _badge(status: str, text: str) -> str:
    color = STATUS_COLORS.get(status, "#555")
    return f"<span class='badge' style='background:{color}'>{html.escape(text)}</span>"


def _runs_html(runs: Any) -> str:
    columns = [("label", "run"), ("status", "status"), ("rounds_done", "rounds"), ("final_accuracy", "final acc"),
               ("mean_identified", "identified"), ("mean_exact", "exact"), ("mean_recovered", "recovered"),
               ("mean_psnr", "PSNR"), ("std_psnr", "PSNR sd"), ("mean_ceiling_psnr", "LS ceiling PSNR"),
               ("mean_ssim", "SSIM"), ("mean_seconds", "attack s"),
               ("faults", "faults"), ("error", "error")]
    columns = [(c, name) for c, name in columns if c in runs.columns]
    head = "".join(f"<th>{html.escape(name)}</th>" for _, name in columns)
    body = []
    for _, row in runs.iterrows():
        cells = []
        for col, _ in columns:
            value = row[col]
            if col == "status":
                cells.append(f"<td class='text'>{_badge(str(value), str(value))}</td>")
            elif col in ("label", "error"):
                text = "" if _missing(value) else str(value)
                cls = "text error" if col == "error" else "text"
                cells.append(f"<td class='{cls}'>{html.escape(text[:200])}</td>")
            else:
                cells.append(f"<td>{_fmt(col, value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value) in ("<NA>", "nan")


def _fmt(col: str, value: Any) -> str:
    if _missing(value):
        return "-"
    if col in ("final_accuracy", "mean_exact", "mean_identified", "mean_recovered"):
        return f"{float(value):.1%}"
    if col in ("mean_psnr", "std_psnr", "mean_ceiling_psnr"):
        return f"{float(value):.1f}"
    if col in ("mean_ssim",):
        return f"{float(value):.3f}"
    if col == "mean_seconds":
        return f"{float(value):.2f}"
    if col == "rounds_done":
        return html.escape(str(int(value)))
    return html.escape(str(value))


def _anchor(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "run"


def _num(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def summary(runs: Any, anchors: dict[str, str] | None = None, tidy: Any = None) -> list[str]:
    """One sentence (HTML) per defense: for each of its settings, what the attack identified at the first and the
    last attacked round (with the updates' least-squares ceiling where records carry it), the epsilon where the
    setting has one, the final accuracy (mean over seeds) and its cost
    in points against no defense, and a link to the setting's image grids."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    if runs is None or runs.empty or "defense" not in runs.columns:
        return []
    anchors = anchors or {}
    runs = runs.copy()
    runs["defense"] = runs["defense"].fillna("none").astype(str)
    runs["final_accuracy"] = pd.to_numeric(runs.get("final_accuracy"), errors="coerce")
    base = runs.loc[runs["defense"] == "none", "final_accuracy"].dropna()
    baseline = float(base.mean()) if len(base) else None
    seeds = runs["seed"] if "seed" in runs.columns else pd.Series([None] * len(runs), index=runs.index)
    by_seed = {sd: float(a) for sd, a, d in zip(seeds, runs["final_accuracy"], runs["defense"])
               if d == "none" and a == a and sd is not None}
    out = []
    order = ["none"] + sorted(d for d in runs["defense"].unique() if d != "none")
    for defense in order:
        part = runs[runs["defense"] == defense]
        if part.empty:
            continue
        items = []
        for label, setting in part.groupby("label", sort=False):
            first, last = _num(setting.get("first_round").mean()) if "first_round" in setting else None, \
                _num(setting.get("last_round").mean()) if "last_round" in setting else None
            both = first is not None and last is not None and first != last
            if both:
                f_id = _num(pd.to_numeric(setting.get("first_identified"), errors="coerce").mean())
                l_id = _num(pd.to_numeric(setting.get("last_identified"), errors="coerce").mean())
                leak = f"identified {_pct(f_id)} at round {first:.0f}, {_pct(l_id)} at round {last:.0f}"
            else:
                leak = f"identified {_pct(_num(pd.to_numeric(setting.get('mean_identified'), errors='coerce').mean()))}"
            raised = pd.to_numeric(setting.get("attacks_raised"), errors="coerce").fillna(0).sum()
            attacks = pd.to_numeric(setting.get("attacks"), errors="coerce").fillna(0).sum()
            if attacks and raised == attacks:
                leak = "every attack raised (nothing measured)"
            # what the updates leave to any attack on the first layer (fedsim.ceiling), where records carry it
            c_first, c_last, c_mean = (_num(_numbers(setting, f"{when}_ceiling_psnr").mean())
                                       for when in ("first", "last", "mean"))
            if both and c_first is not None and c_last is not None:
                leak += f" (least-squares ceiling {c_first:.1f} and {c_last:.1f} dB)"
            elif c_mean is not None:
                leak += f" (least-squares ceiling {c_mean:.1f} dB)"
            text = html.escape(_setting_words(str(label), defense)) if defense != "none" else ""
            eps = _num(pd.to_numeric(setting.get("epsilon"), errors="coerce").max()) if "epsilon" in setting else None
            if eps is not None:
                text += f" (ε = {'∞' if math.isinf(eps) else f'{eps:.3g}'})"
            acc = pd.to_numeric(setting.get("final_accuracy"), errors="coerce").dropna()
            tail = ""
            if len(acc):
                tail = f", final accuracy {acc.mean():.1%}"
                if len(acc) > 1:
                    tail += f" ± {acc.std():.1%} over {len(acc)} seeds"
                if baseline is not None and defense != "none":
                    # against no defense at the same seeds where it ran (same data, model and batches)
                    pairs = [(a, by_seed[sd]) for sd, a in zip(setting.get("seed", []), setting["final_accuracy"])
                             if sd in by_seed and a == a]
                    cost = (sum(a - b for a, b in pairs) / len(pairs)) if pairs else acc.mean() - baseline
                    tail += f" ({100 * cost:+.1f} points against no defense)"
            link = next((anchors[r] for r in setting["run"] if r in anchors), None)
            grid = f" <a href='#{html.escape(link)}'>grids</a>" if link else ""
            items.append(f"{text}: {html.escape(leak + tail)}{grid}" if text else f"{html.escape(leak + tail)}{grid}")
        attacks = _attack_names(tidy, set(part["run"]))
        head = ("No defense" if defense == "none" else html.escape(defense))
        if attacks:
            head += f" (against {html.escape(', '.join(attacks))})"
        end = "; the reference for every accuracy cost below" if defense == "none" and baseline is not None else ""
        out.append(f"<b>{head}</b>: " + "; ".join(items) + end + ".")
    return out


def _attack_names(tidy: Any, runs: set) -> list[str]:
    """The attacks recorded for these runs (from the tidy table)."""
    if tidy is None or "attack" not in getattr(tidy, "columns", ()) or "run" not in tidy.columns:
        return []
    return sorted(str(a) for a in tidy.loc[tidy["run"].isin(runs), "attack"].dropna().unique())


def _setting_words(label: str, defense: str) -> str:
    """`defense=noise, defense.clip=4, defense.sigma=1e-05` -> `clip=4, sigma=1e-05` (the defense is the sentence's
    subject); attack names and budgets are left out."""
    kept = [p.strip().replace("defense.", "") for p in label.split(",")
            if not p.strip().startswith(("defense=", "attack"))]
    return ", ".join(kept)   # empty for a defense run without knobs (secagg): the sentence's subject says it


def keylock_table(tidy: Any) -> str:
    """Key-lock's claim as one HTML table (fedsim.plots.keylock_summary): FedAvg's final accuracy without and
    with the block, mean and spread over seeds, beside the attack's success per attacker option at the first and
    the last attacked round. Empty when the study ran no key-lock."""
    table = keylock_summary(tidy)
    if table.empty:
        return ""
    head = ("<tr><th>setting</th><th>final accuracy (mean ± sd, seeds)</th><th>attack</th>"
            "<th>identified, first → last round</th><th>PSNR dB, first → last round</th></tr>")
    body = []
    for _, row in table.iterrows():
        seeds = accuracy_by_seed(tidy, row["defense"])
        acc = "-" if seeds.empty else f"{seeds.mean():.1%}" + (
            f" ± {seeds.std():.1%} ({len(seeds)} seeds)" if len(seeds) > 1 else " (1 seed)")
        rounds = f"{row['first_round']} → {row['last_round']}" if row["first_round"] != row["last_round"] else ""
        ident = f"{_pct(_num(row['first_identified']))} → {_pct(_num(row['last_identified']))}"
        psnr = " → ".join("-" if _num(v) is None else f"{float(v):.1f}" for v in (row["first_psnr"], row["last_psnr"]))
        body.append(f"<tr><td class='text'>{html.escape(str(row['arm']))}</td><td>{html.escape(acc)}</td>"
                    f"<td class='text'>{html.escape(str(row['attack']))}</td><td>{html.escape(ident)}</td>"
                    f"<td>{html.escape(psnr)}</td></tr>")
    note = ("<p class='meta'>Training does not depend on the attacker option (a threat-model setting): the "
            "accuracy of each key-lock row is that of the key-lock runs over all their seeds"
            + (f"; attacked rounds {html.escape(rounds)}" if rounds else "") + ".</p>")
    return f"<table class='keylock'><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>{note}"
