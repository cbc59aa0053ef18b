"""Runtimes: where the same ServerApp and ClientApp run.

- `inline`: one process, clients called in turn through an in-memory Grid (no Ray): fast start, for tests,
  laptops and the demo.
- `ray`: Flower's Simulation Engine (`flwr.simulation.run_simulation`), clients in Ray actors.
- `deployment`: Flower's Deployment Engine, `flwr run` against a SuperLink with SuperNodes (`fedsim.deployment`).

All pass the run's configuration to the ServerApp through its run config, exactly as `flwr run` does.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedsim.config import RUNTIMES, NodesConfig, register_runtime, runtime_config
from fedsim.console import quiet_flower  # noqa: F401  (re-exported)
from fedsim.errors import ConfigError
from fedsim.protocol import KEY_SEED, PARTITION_KEY, PARTITIONS_KEY, SIMULATED_KEY
from fedsim.schema import knob
from fedsim.threads import child_env

log = logging.getLogger("fedsim")

# --- what each simulated SuperNode holds of its own ---------------------------------------------------------------

def node_configs(cfg: NodesConfig, clients: int) -> dict[int, dict]:
    """partition id -> what that simulated node adds to its node config."""
    if cfg.key_seed is None:
        return {pid: {} for pid in range(clients)}
    return {pid: {KEY_SEED: cfg.key_seed} for pid in range(clients)}  # a client mixes in its partition id


def launch(server_app: ServerApp, client_app: ClientApp, run_config: dict, runtime_node: Any, *, clients: int,
           nodes: NodesConfig = NodesConfig()) -> None:
    """Run `server_app` and `client_app` (fedsim's: `fedsim.server_app.app`, `fedsim.client_app.app`) on the
    configured runtime with `run_config` as the app's run config; simulated node i gets `node_configs(nodes,
    clients)[i]` in its node config. A runtime receives the apps it runs; it never imports them."""
    name, config = runtime_config(runtime_node)
    spec = RUNTIMES.get(name)
    if spec.simulated:
        client_app = with_node_config(client_app, node_configs(nodes, clients))
    spec.launch(config, server_app, client_app, run_config, clients)


def with_run_config(server_app: ServerApp, run_config: Mapping[str, Any]) -> ServerApp:
    """A ServerApp that runs `server_app` with `run_config` added to its Context (for runtimes without one)."""
    wrapper = ServerApp()

    @wrapper.main()
    def _main(grid: Grid, context: Context) -> None:
        context.run_config.update(run_config)
        server_app(grid, context)

    return wrapper


def with_node_config(client_app: ClientApp, extra: dict[int, dict]) -> ClientApp:
    """`client_app` on nodes whose node config also holds `extra[partition id]` (what a SuperNode's operator would
    pass with --node-config): the simulation runtimes have no other way to give a virtual node its own values."""
    if not any(extra.values()):
        return client_app

    def node_config_mod(msg: Message, context: Context, call_next) -> Message:
        context.node_config.update(extra.get(int(context.node_config.get("partition-id", -1)), {}))
        return call_next(msg, context)

    wrapper = ClientApp(mods=[node_config_mod])

    def delegate(msg: Message, context: Context) -> Message:
        return client_app(msg, context)

    wrapper.train()(delegate)
    wrapper.evaluate()(delegate)
    wrapper.query()(delegate)
    return wrapper


# --- inline: an in-memory Grid -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class InlineConfig:
    """In-process runtime: no knobs."""


class InlineGrid(Grid):
    """A Grid that delivers each message by calling the ClientApp of its node in this process.

    Instructions are deep-copied (strategies send one RecordDict to every node), exceptions become error replies
    as on Flower's engines, and every node keeps its own Context across rounds. Relies on two Flower internals
    that `run_simulation` also uses: the private message id and the process-wide TaskIdentity.

    Clients run one after another, on a worker thread: with a `timeout`, a client that has not replied within
    `timeout` seconds of its own start is left behind on that thread (its reply never arrives, as on a real
    grid) and the next one starts, on a new thread. So a round with k late clients lasts its clients' training
    plus k x timeout.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict | None = None,
                 node_seed: int | None = None) -> None:
        # Node ids are random per run, as on a SuperLink, so nothing can rely on them; `node_seed` fixes them
        # (to compare two runs of a strategy that samples by node id).
        rng = random.Random(node_seed)
        self.run_id = rng.getrandbits(63)
        self.client_app = client_app
        self.contexts: dict[int, Context] = {}
        for pid in range(num_nodes):
            node_id = rng.getrandbits(63)
            # the node config says what a node is: partition `pid` of `num_nodes`, on a virtual node (a simulation)
            self.contexts[node_id] = Context(run_id=self.run_id, node_id=node_id,
                                             node_config={PARTITION_KEY: pid, PARTITIONS_KEY: num_nodes,
                                                          SIMULATED_KEY: True},
                                             state=RecordDict(), run_config=dict(run_config or {}))
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=self.run_id)
        self._worker: _Worker | None = None

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message], timeout: float | None = None) -> Iterable[str]:
        messages = list(messages)
        ids = []
        for msg in messages:
            msg_id = str(uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id
            ids.append(msg_id)
        for msg_id, reply in zip(ids, self._deliver_all_within(messages, timeout)):
            if reply is not None:
                self._replies[msg_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages, timeout))

    def _deliver_all_within(self, messages: list[Message], timeout: float | None) -> list[Message | None]:
        """The nodes' replies in turn; None for a node that took longer than `timeout` seconds from its own start
        (its thread is left to finish alone and the messages after it go to a new thread)."""
        if timeout is None:
            return [self._deliver(msg) for msg in messages]
        replies: list[Message | None] = [None] * len(messages)
        pending = list(enumerate(messages))
        while pending:
            if self._worker is None:
                self._worker = _Worker(self._deliver)
            done, pending, late = self._worker.run(pending, timeout)
            for index, reply in done.items():
                replies[index] = reply
            if late:  # the worker is busy with the late client until it finishes; the rest get a new one
                self._worker.retire()
                self._worker = None
        return replies

    def close(self) -> None:
        """Let the worker thread end (once its client, if one is late, has finished)."""
        if self._worker is not None:
            self._worker.retire()
            self._worker = None

    def _deliver(self, msg: Message) -> Message:
        instruction = copy.deepcopy(msg, _shared_arrays(msg))
        context = self.contexts.get(msg.metadata.dst_node_id)
        if context is None:
            reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="unknown node"), reply_to=instruction)
        else:
            try:
                reply = self.client_app(instruction, context)
            except Exception as err:  # a client's exception is its reply, as on Flower's engines
                reason = f"{type(err)}:<'{err}'>"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                                reply_to=instruction)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply


class _Worker:
    """One thread that delivers a round's messages, one after another, for as long as each replies in time.

    The round is handed over at once and the server's thread waits once: until the last reply, or until the
    client being served has run `timeout` seconds. Handing each message over and its reply back cost 0.25 ms a
    client (two thread wake-ups) on a quiet 2-core machine; a thread per message cost more (0.15 ms of CPU and
    0.4 ms of wall time on a busy one). A client that is late keeps its thread: the worker is retired (it ends
    after that client) and the grid hands the messages not yet started to a new one.
    """

    def __init__(self, deliver) -> None:
        self._deliver = deliver
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, Message]] = deque()   # (index in the round, message), not yet started
        self._done: dict[int, Message | None] = {}
        self._current: float | None = None                    # when the client being served started (monotonic)
        self._retired = False
        threading.Thread(target=self._loop, daemon=True, name="fedsim-inline-client").start()

    def run(self, batch: list[tuple[int, Message]], timeout: float
            ) -> tuple[dict[int, Message | None], list[tuple[int, Message]], bool]:
        """({index: reply, or None if delivering it failed (logged)}, the messages not started, late): late when
        a client ran past `timeout` seconds from its own start; this worker must then be retired."""
        with self._cond:
            self._queue.extend(batch)
            self._done = done = {}
            self._cond.notify_all()
            while self._queue or self._current is not None:
                # a client about to start has all of `timeout` ahead; the loop looks again when that is over
                wait = timeout if self._current is None else self._current + timeout - time.monotonic()
                if wait <= 0:
                    rest = list(self._queue)
                    self._queue.clear()
                    return dict(done), rest, True   # a copy: the late client's thread still holds `done`
                self._cond.wait(wait)
            return done, [], False

    def retire(self) -> None:
        with self._cond:
            self._retired = True
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._retired:
                    self._cond.wait()
                if not self._queue:
                    return
                index, msg = self._queue.popleft()
                self._current = time.monotonic()
                done = self._done
            try:
                reply = self._deliver(msg)
            except BaseException:  # noqa: BLE001 (a client's sys.exit too: the thread must live to serve the rest)
                # as a thread's uncaught exception: reported, and no reply arrives
                log.exception("delivering a message to node %s failed", msg.metadata.dst_node_id)
                reply = None
            with self._cond:
                self._current = None
                done[index] = reply
                if not self._queue:
                    self._cond.notify_all()   # the round is done: the server's thread wakes once


def _shared_arrays(msg: Message) -> dict[int, Any]:
    """A deepcopy memo that keeps the instruction's `Array`s themselves (immutable bytes and their dtype and
    shape; a mod replaces an array, it does not edit one in place) while every record and mapping is copied: a
    third of the copy's cost for a small model."""
    if msg.has_error():
        return {}
    return {id(array): array for record in msg.content.values() if isinstance(record, ArrayRecord)
            for array in record.values()}


@register_runtime("inline", InlineConfig)
def launch_inline(config: InlineConfig, server_app: ServerApp, client_app: ClientApp, run_config: dict,
                  clients: int) -> None:
    grid = InlineGrid(client_app, clients, run_config)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = grid.run_id
    TaskIdentity.node_id = 0
    server_context = Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(),
                             run_config=dict(run_config))
    try:
        server_app(grid, server_context)
    finally:
        grid.close()


# --- ray: Flower's simulation engine -------------------------------------------------------------------------------

LOOPBACK = "127.0.0.1"
_RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode, everything on loopback
_RAY_INLINE_ENV = "RAY_max_direct_call_object_size"  # Ray's limit (bytes) on objects passed inline with a call


@dataclass(frozen=True)
class RayConfig:
    client_cpus: float = knob(1.0, gt=0.0, help="CPUs reserved per client actor (actors = cpus / client_cpus)")
    client_gpus: float = knob(0.0, ge=0.0, help="GPUs per client actor (fractions share a GPU)")
    cpus: int | None = knob(None, ge=1, help="CPUs Ray may use (None: all of this machine's)")
    object_store_mb: int = knob(256, ge=80, help="Ray object store size in MiB (Ray's minimum is 75)")
    log_level: str = knob("ERROR", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="Ray's own log level")
    pull_interval: float = knob(0.01, gt=0.0, help="seconds between the server's polls for replies (Flower: 0.1)")
    inline_mb: float = knob(4.0, ge=0.0, help="a message (or reply) up to this many MiB travels inside Ray's call "
                                              "to the actor, not through its object store (Ray's default: 0.1; sets "
                                              "RAY_max_direct_call_object_size)")
    node_ip: str = knob(LOOPBACK, help="address Ray's processes (GCS, raylet, workers) listen on: 127.0.0.1 keeps "
                                       "them off the network; this machine's LAN address opens them to it")


@register_runtime("ray", RayConfig)
def launch_ray(config: RayConfig, server_app: ServerApp, client_app: ClientApp, run_config: dict,
               clients: int) -> None:
    if logging.getLogger("flwr").level > logging.INFO:  # not verbose: no database-migration chatter (logged on
        logging.getLogger("alembic").setLevel(logging.WARNING)  # import), no deprecation notice
        logging.getLogger("flwr").addFilter(_NotDeprecatedRunSimulation())

    if config.node_ip == LOOPBACK:
        # Ray binds its gRPC servers to all interfaces unless its node address is loopback, and turns a given
        # 127.0.0.1 into the LAN address unless it runs in single-machine mode (the default on macOS/Windows).
        os.environ.setdefault(_RAY_CLUSTER_ENV, "0")
    from flwr.simulation import run_simulation  # heavy: Flower's simulation engine (Ray) loads only for runtime=ray

    if config.node_ip == LOOPBACK and _ray_cluster_mode():
        log.warning("ray was imported before runtime=ray set %s=0: its processes listen on all interfaces "
                    "(set the variable before starting Python to keep them on loopback)", _RAY_CLUSTER_ENV)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray passes an actor call's arguments and result inline up to 100 KiB, larger ones through its shared-memory
    # object store: a 340 KB model each way then cost 13 ms a call instead of 4 ms (2 actors on a busy 2-core
    # machine; 8.6 ms of the driver's CPU instead of 2.5 ms). Ray's processes read it when they start.
    os.environ[_RAY_INLINE_ENV] = str(int(config.inline_mb * 2**20))
    cpus = config.cpus or os.cpu_count() or 1
    if config.client_cpus > cpus:
        raise ConfigError("runtime.client_cpus", config.client_cpus, f"at most runtime.cpus={cpus}")
    backend_config = {
        "client_resources": {"num_cpus": config.client_cpus, "num_gpus": config.client_gpus},
        "init_args": {"num_cpus": cpus, "logging_level": config.log_level, "log_to_driver": False,
                      **({} if config.node_ip == LOOPBACK else {"_node_ip_address": config.node_ip}),
                      "include_dashboard": False, "object_store_memory": config.object_store_mb * 2**20},
    }
    started = time.perf_counter()
    with child_env(max(1, int(config.client_cpus))):  # each actor: the cores reserved for it
        run_simulation(server_app=_on_ray(server_app, run_config, config.pull_interval),
                       client_app=client_app,
                       num_supernodes=clients, backend_config=backend_config)
    log.debug("ray simulation finished in %.1f s", time.perf_counter() - started)


def _ray_cluster_mode() -> bool:
    from ray._private import ray_constants  # heavy: Ray loads only for runtime=ray

    return bool(ray_constants.ENABLE_RAY_CLUSTER)


class _NotDeprecatedRunSimulation(logging.Filter):
    """Drops Flower's notice that `run_simulation` is deprecated, printed on every run: from Python it is still
    the only entry to the Simulation Engine in flwr 1.41 (`flwr run` is what runtime=deployment uses)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def _on_ray(server_app: ServerApp, run_config: dict, pull_interval: float) -> ServerApp:
    """`server_app` with the run config, polling Flower's in-memory Grid for replies every `pull_interval` s.

    Flower's default (0.1 s) rounds every round up to a tenth of a second, which is most of a small round.
    """
    inner = with_run_config(server_app, run_config)
    wrapper = ServerApp()

    @wrapper.main()
    def _main(grid: Grid, context: Context) -> None:
        if hasattr(grid, "pull_interval"):
            grid.pull_interval = pull_interval
        inner(grid, context)

    return wrapper

