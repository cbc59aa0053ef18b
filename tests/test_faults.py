"""Faulty clients are detected, recorded by kind, left out of aggregation, and the run goes on."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from fedsim.config import FLConfig
from fedsim.faults import FaultConfig, draw_fault
from tests.conftest import fedsim_run

BASE = ("data=digits", "model.widths=[32]", "attack=analytic", "fl.batch_size=1", "fl.clients=10")


def expected_faults(cfg: FaultConfig, seed: int, rounds: int, clients: int) -> Counter:
    return Counter((r, c, k) for r in range(1, rounds + 1) for c in range(clients)
                   if (k := draw_fault(cfg, seed, r, c)) is not None)


def test_fault_draws_are_seeded_and_match_their_fractions():
    cfg = FaultConfig(crash=0.1, dropout=0.2, nan=0.3, shape=0.1)
    kinds = Counter(draw_fault(cfg, 0, r, c) for r in range(1, 201) for c in range(50))
    total = 200 * 50
    for kind, share in (("crash", 0.1), ("dropout", 0.2), ("nan", 0.3), ("shape", 0.1), (None, 0.3)):
        assert abs(kinds[kind] / total - share) < 0.015
    assert [draw_fault(cfg, 0, 3, c) for c in range(20)] == [draw_fault(cfg, 0, 3, c) for c in range(20)]


@pytest.mark.parametrize("kind", ["crash", "dropout", "nan", "shape"])
def test_each_fault_kind_is_detected_recorded_and_left_out(tmp_path, kind):
    r = fedsim_run(tmp_path, *BASE, "fl.rounds=2", f"faults.{kind}=0.3")
    expected = expected_faults(FaultConfig(**{kind: 0.3}), 0, 2, 10)
    assert expected, "the draw must hit someone for this test to mean anything"
    recorded = Counter((f["round"], f["client"], f["fault"]) for f in r.faults())
    assert recorded == expected
    for row in r.rounds[1:]:
        bad = sum(1 for (rnd, _, _) in expected if rnd == row["round"])
        assert row["healthy"] == 10 - bad and row["faults"] == bad
        assert math.isfinite(row["loss"])
    attacked = {(a["round"], a["client"]) for a in r.attacks()}
    assert not attacked & {(rnd, c) for rnd, c, _ in expected}           # no attack on garbage
    assert len(attacked) == 20 - len(expected)
    assert r.status["state"] == "complete"


def test_thirty_percent_faulty_in_every_way_for_five_rounds(tmp_path):
    cfg = FaultConfig(crash=0.075, dropout=0.075, nan=0.075, shape=0.075)
    r = fedsim_run(tmp_path, *BASE, "fl.rounds=5", *(f"faults.{k}=0.075" for k in ("crash", "dropout", "nan", "shape")))
    expected = expected_faults(cfg, 0, 5, 10)
    assert Counter((f["round"], f["client"], f["fault"]) for f in r.faults()) == expected
    assert {k for _, _, k in expected} == {"crash", "dropout", "nan", "shape"}
    assert r.status["state"] == "complete" and len(r.rounds) == 6
    assert all(math.isfinite(row["loss"]) and row["accuracy"] > 0 for row in r.rounds)


def test_a_round_with_too_few_healthy_replies_is_skipped_with_the_reason(tmp_path):
    r = fedsim_run(tmp_path, *BASE, "fl.rounds=3", "faults.crash=0.6", "fl.min_clients=6")
    skipped = [row for row in r.rounds if row.get("skipped")]
    assert skipped and all("min_clients=6" in row["skipped"] for row in skipped)
    for row in skipped:   # the global model is unchanged by a skipped round
        before = next(p for p in r.rounds if p["round"] == row["round"] - 1)
        assert row["loss"] == before["loss"]


def test_a_killed_run_leaves_its_finished_rounds_and_an_incomplete_marker(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fedsim.cli", *BASE[1:], "fl.rounds=4", "model.widths=[64]", "attack.targets=1",
           f"hydra.run.dir={out}", "fl.clients=40", "data=patches", "data.per_class=40"]  # ~1 s per round
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        rounds = []
        while time.time() < deadline:
            path = out / "rounds.jsonl"
            rounds = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
            if any(r["round"] == 2 for r in rounds):
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert any(r["round"] == 2 for r in rounds), "the run did not reach round 2 in time"
    rounds = [json.loads(l) for l in (out / "rounds.jsonl").read_text().splitlines()]
    results = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]   # every line valid JSON
    done = max(r["round"] for r in rounds)
    assert 2 <= done < 4
    assert {r["round"] for r in results} <= set(range(1, done + 2))
    status = json.loads((out / "status.json").read_text())
    # never "complete"; a kill between a round's line and the status update leaves the status one round behind
    assert status["state"] == "running" and status["rounds_done"] in (done - 1, done)
    from fedsim.results import run_state

    assert run_state(out) == "incomplete"


HOSTILE = ("data=synthetic", "data.dim=16", "data.train_size=400", "data.test_size=100", "model.widths=[8]",
           "attack=analytic", "fl.batch_size=1")
RECORDED_AS = {"slow": "timeout"}   # every other kind is recorded under its own name


def _global_model_is_finite(r) -> bool:
    return all(row["loss"] is not None and math.isfinite(row["loss"]) for row in r.rounds)


@pytest.mark.parametrize("kind", ["dtype", "huge", "examples", "audit", "impersonate"])
def test_each_hostile_kind_at_thirty_percent_for_five_rounds_is_screened_out(tmp_path, kind):
    r = fedsim_run(tmp_path, *HOSTILE, "fl.clients=8", "fl.rounds=5", f"faults.{kind}=0.3")
    expected = expected_faults(FaultConfig(**{kind: 0.3}), 0, 5, 8)
    assert len(expected) >= 5
    assert Counter((f["round"], f["client"], f["fault"]) for f in r.faults()) == expected
    assert r.status["state"] == "complete" and _global_model_is_finite(r)
    attacked = {(a["round"], a["client"]) for a in r.attacks()}
    assert not attacked & {(rnd, c) for rnd, c, _ in expected}           # never attacked
    for row in r.rounds[1:]:
        assert row["healthy"] == 8 - sum(1 for (rnd, _, _) in expected if rnd == row["round"])


def test_a_slow_client_is_a_timeout_fault_and_its_round_ends_at_the_timeout(tmp_path):
    # seed 7: 3 clients, slow ones in rounds 2 (one) and 4 (two), none in round 1 (which builds the clients' data)
    r = fedsim_run(tmp_path, *HOSTILE, "fl.clients=3", "fl.rounds=5", "seed=7", "faults.slow=0.3",
                   "faults.slow_seconds=30", "fl.timeout=2")
    expected = expected_faults(FaultConfig(slow=0.3), 7, 5, 3)
    assert Counter((f["round"], f["client"], f["fault"]) for f in r.faults()) == Counter(
        (rnd, c, "timeout") for rnd, c, _ in expected)
    late = Counter(rnd for rnd, _, _ in expected)
    assert late == {2: 1, 4: 2}
    for row in r.rounds[1:]:
        # inline runs clients in turn: each late one costs the timeout, never the 30 s it sleeps
        assert 2 * late[row["round"]] <= row["seconds"] < 2 * late[row["round"]] + 2.0, row
        assert row["healthy"] == 3 - late[row["round"]]
    assert r.status["state"] == "complete" and _global_model_is_finite(r)


def _listening(root_pid: int) -> set[tuple[str, int, str]]:
    """(address, port, program) of every TCP socket listening in `root_pid`'s process tree (/proc/net/tcp*)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    tree, todo = set(), [root_pid]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += children.get(pid, [])
    owner = {}
    for pid in tree:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    owner[link[8:-1]] = pid
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owner:   # LISTEN
                address, port = fields[1].split(":")
                try:
                    program = open(f"/proc/{owner[fields[9]]}/cmdline").read().split("\0")[0]
                except OSError:
                    program = "?"
                found.add((address, int(port, 16), program))
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::1


def test_on_ray_hostile_and_late_clients_are_faults_and_nothing_listens_beyond_loopback(tmp_path):
    cfg = FaultConfig(dtype=0.05, huge=0.05, examples=0.05, audit=0.05, impersonate=0.05, slow=0.05)
    expected = expected_faults(cfg, 32, 5, 4)
    assert {k for _, _, k in expected} >= {"audit", "examples", "huge", "impersonate", "slow"}
    sockets, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            sockets.update(_listening(os.getpid()))
            time.sleep(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        r = fedsim_run(tmp_path, *HOSTILE, "runtime=ray", "runtime.cpus=2", "fl.clients=4", "fl.rounds=5",
                       "seed=32", "fl.timeout=5", "faults.slow_seconds=8",
                       *(f"faults.{k}=0.05" for k in ("dtype", "huge", "examples", "audit", "impersonate", "slow")))
    finally:
        done.set()
        watcher.join()
    assert Counter((f["round"], f["client"], f["fault"]) for f in r.faults()) == Counter(
        (rnd, c, RECORDED_AS.get(k, k)) for rnd, c, k in expected)
    assert r.status["state"] == "complete" and _global_model_is_finite(r)
    slow_round = next(rnd for rnd, _, k in expected if k == "slow")
    assert r.rounds[slow_round]["seconds"] < 5 + 2.5                     # the timeout, not the 8 s sleep
    assert any("ray" in program or "python" in program for _, _, program in sockets), "saw no Ray process"
    exposed = {s for s in sockets if s[0] not in LOOPBACK}
    assert not exposed, exposed
