"""runtime=deployment: a SuperLink and two SuperNodes on 127.0.0.1 run the same apps as inline, bit for bit."""

import subprocess
import sys
import time
import tomllib

import pytest
import torch

from fedsim.deployment import descendants, free_ports, run_config_toml, stop_processes
from tests.conftest import fedsim_run

strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.timeout(420)
def test_a_superlink_and_two_supernodes_give_the_inline_updates_and_no_ground_truth(tmp_path):
    args = ("attack=analytic", "fl.batch_size=1", "fl.rounds=2", "fl.clients=2", "data=digits", "model.widths=[32]")
    started = time.monotonic()
    deployed = fedsim_run(tmp_path, *args, "runtime=deployment", "runtime.local=true", "runtime.timeout=300",
                          name="deployment")
    print(f"deployment run: {time.monotonic() - started:.1f} s")
    assert deployed.status["state"] == "complete" and deployed.status["rounds_done"] == 2
    attacks = deployed.attacks()
    assert [(r["round"], r["client"]) for r in attacks] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    # the audit channel is off in deployment: every attack ran and recorded what needs no ground truth, nothing scored
    assert all(r["error"] is None and r["recovered"] == 1 and r["psnr"] is None and r["exact"] is None
               for r in attacks)
    # the same config and seed in-process (audit off too): identical client updates, hence identical models,
    # identical attack records and identical reconstructions
    inline = fedsim_run(tmp_path, *args, "audit=false", name="inline")
    assert strip(deployed.rounds) == strip(inline.rounds)
    assert strip(deployed.results) == strip(inline.results)
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
    values = {"fedsim-config": 'a: "quoted"\nb: \\ tab\t del\x7f é\n', "fedsim-output": "/tmp/x", "fedsim-progress": False}
    assert tomllib.loads(run_config_toml(values)) == values
    ports = free_ports(8)
    assert len(set(ports)) == 8
