"""README.md's demo table is the program's output: `python3 dev.py readme` (or `python -m fedsim.experiments.readme`).

It runs the demo's study afresh (`fedsim -m +experiment=spear_vs_defenses`, small grid) into
`multirun/spear_vs_defenses/readme/`, prints its table (`fedsim-report --markdown`, the same rows the demo
prints), and puts that table into README.md between the two markers below. tests/test_readme_demo.py checks that
README's rows are the demo grid's settings and re-runs the cheapest of them to check their numbers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from fedsim.experiments.sweeps import study_jobs
from fedsim.console import setting_name
from fedsim.paths import CONF_DIR
from fedsim.report import Job, job_label, markdown_table, parse_overrides, swept_keys

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEMO = ("+experiment=spear_vs_defenses",)
FOLDER = Path("multirun") / "spear_vs_defenses" / "readme"
BEGIN = "<!-- demo-table: python3 dev.py readme -->"
END = "<!-- /demo-table -->"


def table_in(text: str) -> str:
    """The Markdown table between the markers of README's text."""
    match = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), text, flags=re.S)
    if match is None:
        raise ValueError(f"README.md has no demo table between {BEGIN!r} and {END!r}")
    return match.group(1)


def with_table(text: str, table: str) -> str:
    """README's text with `table` between the markers."""
    table_in(text)
    start = text.index(BEGIN) + len(BEGIN) + 1
    return text[:start] + table + text[text.index(END, start):]


def rows(table: str) -> dict[str, tuple[str, ...]]:
    """setting -> its cells, from a Markdown table as `fedsim.console.study_markdown` writes it."""
    out = {}
    for line in table.strip().splitlines()[2:]:
        cells = tuple(c.strip() for c in line.strip().strip("|").split("|"))
        out[cells[0]] = cells
    return out


def demo_jobs(extra: tuple[str, ...] = ()) -> list[list[str]]:
    """The demo's jobs (one override list each), as its sweeper expands them."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*DEMO, *extra], return_hydra_config=True)
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    return study_jobs(sweeper.get("params"), sweeper.get("arms"), list(extra), OverridesParser.create())


def demo_settings() -> list[str]:
    """The setting column the demo's table has, one per job (as `fedsim.report` labels them)."""
    jobs = [Job(Path(str(i)), str(i), "complete", parse_overrides(o)) for i, o in enumerate(demo_jobs())]
    keys = swept_keys(jobs)
    return [setting_name(job_label(job, keys)) for job in jobs]


def run_demo(folder: Path, extra: tuple[str, ...] = ()) -> None:
    """The demo's study, from scratch, into `folder` (no report: the table is read from the runs)."""
    shutil.rmtree(folder, ignore_errors=True)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "fedsim.cli", "-m", *DEMO, *extra, "study.report=false",
                    f"hydra.sweep.dir={folder}"], cwd=ROOT, env=env, check=True)


def main() -> int:
    folder = ROOT / FOLDER
    run_demo(folder)
    table = markdown_table(folder)
    README.write_text(with_table(README.read_text(), table))
    print(table, end="")
    print(f"README.md: demo table replaced ({len(rows(table))} rows, runs in {folder})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
