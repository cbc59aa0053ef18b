"""What the user sees while a run goes: a progress bar over rounds, one line per round, a summary table."""

from __future__ import annotations

import logging
import sys
import warnings
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


class RunConsole:
    """Progress and per-round lines on stderr-safe rich output; quiet when `enabled` is False."""

    def __init__(self, rounds: int, title: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=False, highlight=False, force_terminal=None if sys.stdout.isatty() else False)
        self.rounds = rounds
        self.rows: list[dict[str, Any]] = []
        self._progress: Progress | None = None
        self._task = None
        self.title = title

    def start(self) -> None:
        if not self.enabled:
            return
        self.console.print(f"[bold]{self.title}[/bold]")
        self._progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(), console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task("rounds", total=self.rounds)

    def round_done(self, server_round: int, evaluation: Mapping[str, Any], attacks: list[dict],
                   faults: list[dict], skipped: str | None) -> None:
        by_attack: dict[str, list[dict]] = defaultdict(list)
        for row in attacks:
            by_attack[row["attack"]].append(row)
        summary = {"round": server_round, "accuracy": evaluation.get("accuracy"), "loss": evaluation.get("loss"),
                   "faults": len(faults), "skipped": skipped, "attacks": {}}
        parts = []
        for name, rows in by_attack.items():
            def samples(key: str) -> int:
                return sum(round((r.get(key) or 0) * (r.get("batch") or 0)) for r in rows)

            total = sum(r.get("batch") or 0 for r in rows)
            stats = {"identified": _mean([r.get("identified") for r in rows]),
                     "exact": _mean([r.get("exact") for r in rows]), "psnr": _mean([r.get("psnr") for r in rows]),
                     "ssim": _mean([r.get("ssim") for r in rows]), "label_acc": _mean([r.get("label_acc") for r in rows]),
                     "certified": sum(1 for r in rows if r.get("certified")), "clients": len(rows),
                     "errors": sum(1 for r in rows if r.get("error"))}
            summary["attacks"][name] = stats
            text = f"{name} on {len(rows)} client(s):"
            if total and stats["identified"] is not None:
                text += f" identified {samples('identified')}/{total},"
            if total and stats["exact"] is not None:
                text += f" exact {samples('exact')}/{total} samples,"
            text += f" PSNR {_fmt(stats['psnr'], '.1f', ' dB')}"
            if stats["ssim"] is not None:
                text += f", SSIM {stats['ssim']:.3f}"
            if stats["label_acc"] is not None:
                text += f", labels {stats['label_acc']:.0%}"
            if any(r.get("certified") is not None for r in rows):
                text += f", certified {stats['certified']}/{len(rows)}"
            if stats["errors"]:
                text += f", [red]{stats['errors']} failed[/red]"
            parts.append(text)
        self.rows.append(summary)
        if not self.enabled:
            return
        line = f"round {server_round}/{self.rounds}  test acc {_fmt(evaluation.get('accuracy'), '.1%')}"
        line += f"  loss {_fmt(evaluation.get('loss'), '.3f')}"
        if faults:
            kinds = defaultdict(int)
            for f in faults:
                kinds[f["fault"]] += 1
            line += "  [yellow]faults: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + "[/yellow]"
        if skipped:
            line += f"  [red]skipped: {skipped}[/red]"
        self.console.print(line + ("  | " + " | ".join(parts) if parts else ""), soft_wrap=True)
        if self._progress is not None:
            self._progress.advance(self._task)

    def finish(self, directory: str, state: str) -> None:
        if self._progress is not None:
            self._progress.stop()
        if not self.enabled:
            return
        names = sorted({n for row in self.rows for n in row["attacks"]})
        table = Table(title=f"{self.title}: {state}", show_lines=False)
        table.add_column("round", justify="right")
        table.add_column("test acc", justify="right")
        for name in names:
            table.add_column(f"{name} identified", justify="right")
            table.add_column(f"{name} exact", justify="right")
            table.add_column(f"{name} PSNR", justify="right")
            table.add_column(f"{name} SSIM", justify="right")
        table.add_column("faults", justify="right")
        shown = self.rows
        if len(shown) > 12:  # a long run: the attacked rounds and the last (every round is in rounds.jsonl)
            shown = [r for i, r in enumerate(shown) if r["attacks"] or r["faults"] or i == len(shown) - 1]
        for row in shown:
            cells = [str(row["round"]), _fmt(row["accuracy"], ".1%")]
            for name in names:
                s = row["attacks"].get(name, {})
                cells += [_fmt(s.get("identified"), ".0%"), _fmt(s.get("exact"), ".0%"), _fmt(s.get("psnr"), ".1f"),
                          _fmt(s.get("ssim"), ".3f")]
            cells.append(str(row["faults"]))
            table.add_row(*cells)
        self.console.print(table)
        self.console.print(f"results: {directory}")


STUDY_COLUMNS = ("setting", "identified", "exact", "PSNR dB", "LS ceiling dB", "SSIM", "final acc", "attacked rounds")


def setting_name(label: str) -> str:
    """A study row's setting from its run label: `defense=noise, defense.sigma=1e-05` -> `noise, sigma=1e-05`."""
    return str(label).replace("defense.", "").replace("defense=", "")


def study_rows(runs: Any) -> list[tuple[str, ...]]:
    """One row of text per setting of a study (`fedsim.report.runs_table`; runs that differ only in their seed are
    one setting): the setting; the share of each batch identified and recovered exactly, PSNR, the updates'
    least-squares ceiling PSNR (`fedsim.ceiling`) and SSIM, each at the first and the last attacked round
    (`first -> last`) when the run attacked more than one round; the final
    accuracy (mean and spread over seeds when there are several); the attacked rounds. "-": not scored."""
    def num(row: Mapping[str, Any], key: str) -> float | None:
        value = row.get(key)
        return None if value is None or value != value else float(value)   # NaN: not measured

    def pct(value: float | None) -> str:
        return _fmt(None if value is None else 100 * value, ".0f", "%")

    def mean(rows: list[Mapping[str, Any]], key: str) -> float | None:
        return _mean([num(r, key) for r in rows])

    groups: dict[str, list[dict]] = {}
    for row in runs.to_dict("records"):
        groups.setdefault(str(row.get("label") or row.get("run")), []).append(row)
    out = []
    for label, rows in groups.items():
        setting = setting_name(label)
        statuses = sorted({str(r.get("status")) for r in rows if r.get("status") != "complete"})
        if statuses:
            setting += f" ({', '.join(statuses)})"
        raised = int(sum(num(r, "attacks_raised") or 0 for r in rows))
        attacks = int(sum(num(r, "attacks") or 0 for r in rows))
        if raised:  # scored as recovering nothing, which is not the defense holding
            setting += " (every attack raised)" if raised == attacks else f" ({raised}/{attacks} attacks raised)"
        first, last = mean(rows, "first_round"), mean(rows, "last_round")
        both = first is not None and last is not None and first != last

        def cell(metric: str, show) -> str:
            if both:
                return f"{show(mean(rows, f'first_{metric}'))} → {show(mean(rows, f'last_{metric}'))}"
            return show(mean(rows, f"mean_{metric}"))

        accs = [a for a in (num(r, "final_accuracy") for r in rows) if a is not None]
        acc = _fmt(None if not accs else 100 * sum(accs) / len(accs), ".1f", "%")
        if len(accs) > 1:
            spread = (sum((a - sum(accs) / len(accs)) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5
            acc += f" ± {100 * spread:.1f} ({len(accs)} seeds)"
        rounds = "-" if first is None else (f"{first:.0f} → {last:.0f}" if both else f"{first:.0f}")
        out.append((setting, cell("identified", pct), cell("exact", pct), cell("psnr", lambda v: _fmt(v, ".1f")),
                    cell("ceiling_psnr", lambda v: _fmt(v, ".1f")), cell("ssim", lambda v: _fmt(v, ".3f")), acc,
                    rounds))
    return out


def study_table(runs: Any, title: str) -> Table:
    """One row per run of a study (`fedsim.report.runs_table`): the setting, attack success, final accuracy."""
    table = Table(title=title, caption="identified: share of each batch whose reconstruction picks out the true "
                                       "sample among the client's data; a -> b: at the first and the last attacked "
                                       "round; LS ceiling: PSNR of least squares with every sample's true "
                                       "output gradient, what the update leaves to any attack on the first layer; "
                                       "-: not scored (see report/runs.csv)")
    table.add_column(STUDY_COLUMNS[0], justify="left", no_wrap=True)
    for name in STUDY_COLUMNS[1:]:
        table.add_column(name, justify="right", no_wrap=True)
    for cells in study_rows(runs):
        table.add_row(*cells)
    return table


def study_markdown(runs: Any) -> str:
    """The study table as Markdown (what README.md shows for the demo): `fedsim-report --markdown DIR`."""
    lines = ["| " + " | ".join(STUDY_COLUMNS) + " |", "|" + "---|" * len(STUDY_COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in study_rows(runs)]
    return "\n".join(lines) + "\n"


def print_study(runs: Any, title: str) -> None:
    tty = sys.stdout.isatty()   # a log or a pipe gets the whole table (first -> last cells are wide), not 80 columns
    Console(highlight=False, force_terminal=None if tty else False, width=None if tty else 160).print(
        study_table(runs, title))


def quiet_flower(verbose: bool) -> None:
    """Flower logs every message at INFO; keep warnings only unless `verbose`."""
    logger = logging.getLogger("flwr")
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False  # Hydra would print every line twice
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
