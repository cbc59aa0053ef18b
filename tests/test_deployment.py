"""runtime=deployment: a SuperLink and two SuperNodes on 127.0.0.1 run the same apps as inline, bit for bit."""

import subprocess
import sys
import time
import tomllib

import pytest
import torch

from fedsim.deployment import descendants, free_ports, run_config_toml, stop_processes
from tests.conftest import fedsim_run


def _attack() -> tuple[str, ...]:
    """SPEAR when it is installed (certificate, labels, matching loss to record), else the analytic inversion."""
    from fedsim.attacks.base import ATTACKS

    if "spear" in ATTACKS:
        return ("attack=spear", "attack.max_seconds=60", "fl.batch_size=4", "model.widths=[100]")
    return ("attack=analytic", "fl.batch_size=1", "model.widths=[32]")


def _comparable(rows):
    """Records without wall-clock fields."""
    out = []
    for row in rows:
        row = {k: v for k, v in row.items() if k != "seconds"}
        if isinstance(row.get("stats"), dict):
            row["stats"] = {k: v for k, v in row["stats"].items() if "second" not in k and "time" not in k}
        out.append(row)
    return out


@pytest.mark.timeout(420)
def test_a_superlink_and_two_supernodes_give_the_inline_updates_and_no_ground_truth(tmp_path):
    args = (*_attack(), "fl.rounds=2", "fl.clients=2", "data=digits")
    started = time.monotonic()
    deployed = fedsim_run(tmp_path, *args, "runtime=deployment", "runtime.local=true", "runtime.timeout=300",
                          name="deployment")
    print(f"deployment run: {time.monotonic() - started:.1f} s")
    assert deployed.status["state"] == "complete" and deployed.status["rounds_done"] == 2
    attacks = deployed.attacks()
    assert [(r["round"], r["client"]) for r in attacks] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    # the audit channel is off in deployment: every attack ran and recorded what needs no ground truth, nothing scored
    assert all(r["error"] is None and r["returned"] > 0 and r["psnr"] is None and r["exact"] is None
               for r in attacks)
    if attacks[0]["attack"] == "spear":
        assert all(r["certified"] is not None and r["matching_loss"] is not None for r in attacks)
    # the same config and seed in-process (audit off too): identical client updates, hence identical models,
    # identical attack records and identical reconstructions
    inline = fedsim_run(tmp_path, *args, "audit=false", name="inline")
    assert _comparable(deployed.rounds) == _comparable(inline.rounds)
    assert _comparable(deployed.results) == _comparable(inline.results)
    files = sorted(p.name for p in (inline.directory / "reconstructions").iterdir())
    assert files == sorted(p.name for p in (deployed.directory / "reconstructions").iterdir()) and len(files) == 4
    for name in files:
        a = torch.load(deployed.directory / "reconstructions" / name)
        b = torch.load(inline.directory / "reconstructions" / name)
        assert torch.equal(a["inputs"], b["inputs"])
    assert (deployed.directory / "grids" / files[0].replace(".pt", ".png")).exists()   # reconstructions alone


def test_stopping_a_process_also_stops_what_it_detached():
    # like a SuperNode starting flwr-clientapp: the grandchild lives in a session of its own
    script = "import subprocess, time; subprocess.Popen(['sleep', '60'], start_new_session=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while not descendants(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = descendants(proc.pid)
    assert children
    stop_processes([proc], grace=5)
    assert proc.poll() is not None
    time.sleep(0.2)
    for pid in children:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue          # gone
        assert state == "Z"   # exited, waiting for init to reap it


def test_the_run_config_survives_toml_and_ports_are_distinct():
    values = {"fedsim-config": 'a: "quoted"\nb: \\ tab\t del\x7f é\n', "fedsim-output": "/tmp/x",
              "fedsim-progress": False}
    assert tomllib.loads(run_config_toml(values)) == values
    ports = free_ports(8)
    assert len(set(ports)) == 8


def test_a_run_past_its_timeout_is_stopped():
    from fedsim.deployment import _lines
    from fedsim.errors import FedsimError

    script = "import time; print('started', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    started = time.monotonic()
    lines = []
    with pytest.raises(FedsimError, match="runtime.timeout"):
        for line in _lines(proc, time.monotonic() + 2.0, None):
            lines.append(line)
    stop_processes([proc], grace=5)
    assert lines == ["started"] and time.monotonic() - started < 15 and proc.poll() is not None
