"""The README's "Audit your own Flower app" example, run as written in Flower's simulation engine (Ray)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- audit-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its audit example"
    return match.group(1)


def test_the_readme_audit_example_runs_as_written_and_spear_recovers_every_batch(tmp_path):
    (tmp_path / "my_app.py").write_text(readme_example())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_DEDUP_LOGS": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "my_app.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "audit-results"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    attacks = [r for r in rows if r["kind"] == "attack"]
    assert len(attacks) == 3 * 2                                  # 3 clients x 2 rounds
    assert all(r["attack"] == "spear" and r["exact"] == 1.0 and r["certified"] for r in attacks), attacks
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["rounds_done"], status["rounds_total"], status["warnings"]) == ("complete", 2, 2, [])
    assert sorted(p.name for p in (out / "grids").glob("*.png")) == \
        [f"round00{r}_client{c}_spear.png" for r in (1, 2) for c in (0, 1)]       # first and last round
    threat = yaml.safe_load((out / "config.yaml").read_text())["threat"]
    assert (threat["local_epochs"], threat["batch_size"], threat["normalization"]["mean"]) == (1, 8, [0.3])
    assert [r["round"] for r in (json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines())] == [1, 2]
    report = subprocess.run([sys.executable, "-m", "fedsim.report", str(out)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (out / "report" / "index.html").exists()
