"""runtime=deployment: the federation on Flower's Deployment Engine, a SuperLink and its SuperNodes.

The composed Hydra config goes to `flwr run` as the app's run config (`fedsim-config`, `fedsim-output`), the
SuperLink starts the same ServerApp in a process of its own, and SuperNodes run the same ClientApp, each on the
data partition its operator named (`--node-config "partition-id=N num-partitions=M"`). The ServerApp writes the
results to `fedsim-output`, an absolute path on the SuperLink's machine.

`runtime.local=true` starts a SuperLink and one SuperNode per client on 127.0.0.1 for this run only (free ports,
plain HTTP on loopback, a temporary FLWR_HOME) and stops them, with every process they spawned, when it ends.
The flwr CLI always gets a FLWR_HOME of its own, so the user's ~/.flwr is never read or written.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedsim.config import register_runtime, validate
from fedsim.errors import ConfigError, FedsimError
from fedsim.processes import process_alive
from fedsim.protocol import OUTPUT_KEY, PROGRESS_KEY, RUN_CONFIG_KEY
from fedsim.schema import knob

log = logging.getLogger("fedsim")

CONNECTION = "fedsim"          # the SuperLink connection's name in the CLI's config.toml
FLWR_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


@dataclass(frozen=True)
class DeploymentConfig:
    superlink: str = knob("127.0.0.1:8000", help="SuperLink address host:port (its Control API; one port in flwr 1.41)")
    insecure: bool = knob(False, help="plain HTTP, no TLS (only for 127.0.0.1 or a trusted network)")
    root_certificates: str | None = knob(None, help="PEM file of the CA that signed the SuperLink's TLS certificate")
    local: bool = knob(False, help="start a SuperLink and fl.clients SuperNodes on 127.0.0.1 for this run")
    app_dir: str | None = knob(None, help="the Flower app to ship (null: this fedsim checkout)")
    flwr_home: str | None = knob(None, help="FLWR_HOME of the flwr CLI (null: a fresh temporary directory)")
    timeout: float | None = knob(None, gt=0.0, help="seconds the whole run may take, then it stops (null: no limit)")
    startup_timeout: float = knob(120.0, gt=0.0, help="seconds for a local SuperLink to answer its health check")


@register_runtime("deployment", DeploymentConfig, simulated=False)
def launch_deployment(config: DeploymentConfig, server_app, client_app, run_config: dict, clients: int) -> None:
    """Submit the run with `flwr run` and follow it to its end (the app objects travel as the app's code)."""
    app_dir = _app_dir(config.app_dir)
    run_config = {PROGRESS_KEY: True, **run_config}
    run_config[OUTPUT_KEY] = str(Path(run_config.get(OUTPUT_KEY) or "outputs/flwr-run").resolve())
    verbose = _verbose(run_config)
    with _scratch(config.flwr_home) as home:
        if config.local:
            with LocalFederation(clients, home / "local", audit=_audit(run_config),
                                 startup_timeout=config.startup_timeout) as federation:
                _submit(home, federation.address, app_dir, run_config, insecure=True, root_certificates=None,
                        timeout=config.timeout, verbose=verbose, watch=federation)
        else:
            _submit(home, config.superlink, app_dir, run_config, insecure=config.insecure,
                    root_certificates=config.root_certificates, timeout=config.timeout, verbose=verbose)


# --- flwr run ------------------------------------------------------------------------------------------------------

def _submit(home: Path, address: str, app_dir: Path, run_config: dict, *, insecure: bool,
            root_certificates: str | None, timeout: float | None, verbose: bool,
            watch: LocalFederation | None = None) -> None:
    """`flwr run --stream` against `address`; raises FedsimError unless the run finishes `completed`."""
    cli_home = home / "cli"
    cli_home.mkdir(parents=True, exist_ok=True)
    (cli_home / "config.toml").write_text(connection_toml(address, insecure, root_certificates))
    run_config_file = cli_home / "run-config.toml"
    run_config_file.write_text(run_config_toml(run_config))
    env = flower_env(cli_home)
    command = [_binary("flwr"), "run", str(app_dir), CONNECTION, "--stream", "--run-config", str(run_config_file)]
    deadline = None if timeout is None else time.monotonic() + timeout
    run_id = None
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(command, env=env, cwd=cli_home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    try:
        for line in _lines(proc, deadline, watch):
            tail.append(line)
            found = re.search(r"started run (\d+)", line)
            if found:
                run_id = int(found.group(1))
                print(f"fedsim: run {run_id} on SuperLink {address}", flush=True)
                continue
            if verbose or not _flower_noise(line):
                print(line, flush=True)
        proc.wait()
    except BaseException:
        if run_id is not None:
            _flwr(["stop", str(run_id), CONNECTION], env)
        raise
    finally:
        stop_processes([proc])
    if run_id is None:
        message = " ".join(re.sub(r"[│╭╮╰╯─]", " ", line).strip() for line in tail if "Error" not in line)
        raise FedsimError(f"flwr run started no run on {address}: {' '.join(message.split())[-300:]}")
    status, details = run_status(run_id, env)
    if status != "finished:completed":
        raise FedsimError(f"run {run_id} on {address} ended {status}: {details}")


def _lines(proc: subprocess.Popen, deadline: float | None, watch: LocalFederation | None) -> Iterator[str]:
    """The process's output lines as they come; FedsimError past `deadline` or when a local process dies."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            line = ""
        if line is None:
            return
        if line:
            yield line
        if deadline is not None and time.monotonic() > deadline:
            raise FedsimError("the run took longer than runtime.timeout; stopped")
        if watch is not None:
            watch.check()


def run_status(run_id: int, env: dict) -> tuple[str, str]:
    """('finished:completed' | 'finished:failed' | ..., details) of a run, from `flwr ls`."""
    out = _flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env)
    try:
        runs = json.loads(out[out.index("{"):])["runs"]
        return str(runs[0]["status"]), str(runs[0].get("status-details", ""))
    except (ValueError, KeyError, IndexError) as err:
        return "unknown", f"flwr ls gave no status ({err}): {out[-500:]}"


def _flwr(args: list[str], env: dict) -> str:
    """Output of one flwr CLI command ('' when it does not answer within two minutes)."""
    try:
        done = subprocess.run([_binary("flwr"), *args], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout + done.stderr


def _flower_noise(line: str) -> bool:
    """Flower's own INFO lines and the CLI's chatter (shown with verbose=true)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", line)
    return plain.startswith(("INFO ", "DEBUG ", "Using SuperLink", "Successfully installed", "Successfully built"))


def connection_toml(address: str, insecure: bool, root_certificates: str | None) -> str:
    """The CLI's config.toml: one SuperLink connection, the default."""
    lines = ["[superlink]", f"default = {_toml_str(CONNECTION)}", "", f"[superlink.{CONNECTION}]",
             f"address = {_toml_str(address)}"]
    if insecure:
        lines.append("insecure = true")
    elif root_certificates:
        lines.append(f"root-certificates = {_toml_str(str(Path(root_certificates).expanduser().resolve()))}")
    return "\n".join(lines) + "\n"


def run_config_toml(values: dict) -> str:
    """A `--run-config` file: strings, booleans and numbers, checked by parsing it back."""
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value!r}")
        else:
            lines.append(f"{key} = {_toml_str(str(value))}")
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != values:
        raise FedsimError("the run config does not survive TOML (please report this)")
    return text


def _toml_str(value: str) -> str:
    """A TOML basic string (a JSON string is one, once DEL is escaped too)."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


# --- a federation on 127.0.0.1 -------------------------------------------------------------------------------------

class LocalFederation:
    """A SuperLink and `clients` SuperNodes on 127.0.0.1, plain HTTP, stopped (with all they spawned) on exit.

    SuperNode i holds partition i (`--node-config "partition-id=i num-partitions=clients"`). With `audit`, each
    also consents to the audit channel (`fedsim-audit=true`, fedsim.audit.may_audit): whoever starts them owns
    their data.
    """

    def __init__(self, clients: int, directory: Path, *, audit: bool = False, startup_timeout: float = 120.0) -> None:
        self.clients = clients
        self.dir = Path(directory)
        self.audit = audit
        self.startup_timeout = startup_timeout
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.address = ""

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        link_port, *node_ports = free_ports(1 + self.clients)
        self.address = f"127.0.0.1:{link_port}"
        self._spawn("superlink", [_binary("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                  str(link_port), "--disable-runtime-dependency-installation"])
        self._wait_healthy(link_port)
        for pid, port in enumerate(node_ports):
            node_config = f"partition-id={pid} num-partitions={self.clients}"
            if self.audit:
                node_config += " fedsim-audit=true"
            self._spawn(f"supernode{pid}", [_binary("flower-supernode"), "--insecure", "--superlink", self.address,
                                            "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config])

    def check(self) -> None:
        """FedsimError naming the first of our processes that has exited."""
        for proc, path in zip(self.processes, self.logs):
            if proc.poll() is not None:
                raise FedsimError(f"{path.stem} exited with status {proc.returncode}; its log ends:\n"
                                  + _tail(path))

    def stop(self) -> None:
        stop_processes(self.processes)

    def _spawn(self, name: str, command: list[str]) -> None:
        home = self.dir / name                     # one FLWR_HOME each: SuperNodes install the app into theirs
        home.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{name}.log"
        with open(path, "wb") as out:
            proc = subprocess.Popen(command, env=flower_env(home), cwd=home, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(proc)
        self.logs.append(path)

    def _wait_healthy(self, port: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self.check()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise FedsimError(f"the local SuperLink did not answer within {self.startup_timeout:.0f} s; its log ends:\n"
                          + _tail(self.logs[0]))


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now (held together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def stop_processes(processes: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` s: each process, its process group and every descendant.

    Flower detaches the processes it spawns (SuperExec, flwr-serverapp, flwr-clientapp) into sessions of their
    own, so their process groups are not ours: they are found through the process tree before anything is killed.
    """
    alive = [p for p in processes if p.poll() is None]
    if not alive:
        return
    pids = set()
    for proc in alive:
        pids.add(proc.pid)
        pids.update(descendants(proc.pid))
    groups = {proc.pid for proc in alive}             # each was started in a session (and group) of its own
    _signal(groups, pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in alive:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    remaining = {pid for pid in pids if process_alive(pid)}
    while remaining and time.monotonic() < deadline:
        time.sleep(0.2)
        remaining = {pid for pid in remaining if process_alive(pid)}
    _signal({g for g in groups if process_alive(g)}, remaining, signal.SIGKILL)
    for proc in alive:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("process %d did not stop", proc.pid)


def descendants(pid: int) -> set[int]:
    """PIDs of every process below `pid` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal(groups: set[int], pids: set[int], sig: int) -> None:
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


# --- environment ---------------------------------------------------------------------------------------------------

def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's processes: our FLWR_HOME, no telemetry, no runtime `uv sync`, our venv's binaries
    first on PATH (the SuperLink starts `flower-superexec` by name) and absolute PYTHONPATH entries."""
    env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(flwr_home)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    return env


def _binary(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FedsimError(f"'{name}' was not found next to {sys.executable} or on PATH (pip install 'flwr>=1.41')")
    return found


def _app_dir(configured: str | None) -> Path:
    path = Path(configured).expanduser().resolve() if configured else Path(__file__).resolve().parent.parent
    pyproject = path / "pyproject.toml"
    app = (tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}).get("app")
           if pyproject.is_file() else None)
    if not app:
        raise ConfigError("runtime.app_dir", str(path), "a Flower app directory (pyproject.toml with [tool.flwr.app])")
    return path


@contextmanager
def _scratch(configured: str | None) -> Iterator[Path]:
    """FLWR_HOME: the configured directory, or a temporary one removed afterwards."""
    if configured:
        path = Path(configured).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="fedsim-flwr-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _verbose(run_config: dict) -> bool:
    return bool((yaml.safe_load(run_config.get(RUN_CONFIG_KEY) or "") or {}).get("verbose", False))


def _audit(run_config: dict) -> bool:
    """The run asks for ground truth (config `audit`, resolved: off in deployment unless set)."""
    return validate(yaml.safe_load(run_config[RUN_CONFIG_KEY]), deep=False).audit
