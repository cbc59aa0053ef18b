"""The fedsim ServerApp (Flower Message API): train, attack every update, score, record.

The app reads the run's configuration from its run config (`fedsim-config`: YAML; `fedsim-output`: the run
directory), so the same object runs in-process, on Ray's simulation engine and under `flwr run` on a SuperLink.
`run_federation` holds the whole server side and is what every runtime ends up calling.

Layer: the federation; the runtimes receive this app (they never import it).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsim.attacks.base import build_attack
from fedsim.defenses.base import build_defense
from fedsim.config import RunConfig, threat_model, validate
from fedsim.console import RunConsole, quiet_flower
from fedsim.data import load_dataset
from fedsim.data.partition import partition
from fedsim.errors import FedsimError
from fedsim.faults import LossyGrid
from fedsim.grids import TimeoutGrid
from fedsim.hook import CuriousStrategy, make_scorer
from fedsim.models import build_model
from fedsim.protocol import (
    AGGREGATE_CLIENT,
    AUDIT_FLAG,
    CLIENT_KEY,
    CONFIG_KEY,
    OUTPUT_KEY,
    PROGRESS_KEY,
    RUN_CONFIG_KEY,
)
from fedsim.results import ResultsWriter, RunRecorder
from fedsim.schedule import AttackSchedule
from fedsim.strategy import FedsimStrategy
from fedsim.threads import for_library, using
from fedsim.training import evaluate

log = logging.getLogger("fedsim")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config_yaml = str(context.run_config.get(RUN_CONFIG_KEY, "") or "")
    if not config_yaml:
        raise FedsimError(f"run config '{RUN_CONFIG_KEY}' is empty: start runs with the fedsim CLI "
                          "(fedsim runtime=deployment ...), which passes the composed configuration")
    output = str(context.run_config.get(OUTPUT_KEY, "") or "outputs/flwr-run")
    run = validate(yaml.safe_load(config_yaml))
    quiet_flower(run.verbose)  # under flwr run this is a process of its own
    # threads=N holds in a process of its own too (flwr run's); else the process's torch setting, which in a fresh
    # process is OMP_NUM_THREADS or the cores (the CLI's choice, passed on in the environment); inside a runtime of
    # this process the choice already made holds
    with using(for_library(run.threads)):
        run_federation(grid, run, output, show_progress=bool(context.run_config.get(PROGRESS_KEY, True)))


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """Block until `count` nodes are connected (Flower samples before all have joined otherwise)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise FedsimError(f"only {len(nodes)} of {count} clients connected within fl.discovery_timeout="
                              f"{timeout:g} s: start the missing SuperNodes, or raise fl.discovery_timeout")
        time.sleep(0.2)


def discover_partitions(grid: Grid, nodes: list[int], clients: int, timeout: float,
                        config_yaml: str | None = None) -> dict[int, int]:
    """Ask every node for its partition id (node ids are random per run): node id -> partition id.

    With `config_yaml` (the run's config, as train instructions carry it) clients also load their data and build
    their model now, within the discovery timeout, so that the first round's fl.timeout is not spent on it."""
    content = {"config": ConfigRecord({CONFIG_KEY: config_yaml})} if config_yaml else {}
    messages = [Message(RecordDict(content), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    silent = sorted(set(nodes) - {r.metadata.src_node_id for r in replies})
    if silent:
        raise FedsimError(f"{len(silent)} of {len(nodes)} clients did not report their partition within "
                          f"fl.discovery_timeout={timeout:g} s (a client's first message starts it, which can be "
                          f"slow on a busy machine): raise fl.discovery_timeout")
    partition_of = {}
    for reply in replies:
        if reply.has_error():
            raise FedsimError(f"node {reply.metadata.src_node_id} failed to report its partition: "
                              f"{reply.error.reason[:200]}")
        info = reply.content.config_records.get(CLIENT_KEY)
        pid = info.get("partition-id") if info is not None else None
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise FedsimError(f"node {reply.metadata.src_node_id} reported no partition id ({pid!r})")
        partition_of[reply.metadata.src_node_id] = pid
        if int(info.get("num-partitions", clients)) != clients:  # its data would be a slice of another split
            raise FedsimError(f"node {reply.metadata.src_node_id} holds partition {info['partition-id']} of "
                              f"{info['num-partitions']}, but the run splits the data into fl.clients={clients}")
    found = sorted(partition_of.values())
    if found != list(range(clients)):
        raise FedsimError(f"expected one client per partition 0..{clients - 1}, the nodes reported {found}")
    return partition_of


def run_federation(grid: Grid, run: RunConfig, output: str, *, show_progress: bool = True) -> dict:
    """Run the whole federation on `grid`; results go to the directory `output`. Returns the last round's row."""
    config_yaml = yaml.safe_dump(_shippable(run.raw), sort_keys=False)   # what clients receive
    writer = ResultsWriter(output)
    writer.start(yaml.safe_dump({k: v for k, v in run.raw.items() if k != "hydra"}, sort_keys=False), run.fl.rounds)
    writer.update_status(torch_threads=torch.get_num_threads())  # of the attacks, scoring, evaluation (threads)
    attack = build_attack(run.attack)
    defense = build_defense(run.defense)
    console = RunConsole(run.fl.rounds, f"fedsim: {attack.name} vs defense {defense.name}", enabled=show_progress)
    try:
        bundle = load_dataset(run.data)

        def model_fn():  # the server's model: what the defense lets it hold (key-lock: shared layers only)
            return defense.build_model(build_model(run.model, bundle.input_shape, bundle.num_classes, run.seed),
                                       private=False)

        recorder = RunRecorder(writer, run_info={"defense": defense.name, **_prefixed(defense.strength()),
                                                 "seed": run.seed, "mode": run.fl.mode,
                                                 "batch_size": run.fl.batch_size},
                               rounds=run.fl.rounds, grid_clients=run.output.grid_clients,
                               grid_every_round=run.output.grid_every_round, console=console,
                               grid_rounds=_grid_rounds(run))
        nodes = wait_for_nodes(grid, run.fl.clients, run.fl.discovery_timeout)
        partition_of = discover_partitions(grid, nodes, run.fl.clients, run.fl.discovery_timeout, config_yaml)
        grid = TimeoutGrid(grid)  # a reply later than fl.timeout is a timeout fault
        if run.faults.dropout > 0:
            grid = LossyGrid(grid, run.faults, run.seed, partition_of)
        grid = defense.wrap_grid(grid, run)  # secure aggregation runs its protocol here
        server_model = model_fn()
        parameters = {name for name, _ in server_model.named_parameters()}
        sampler = FedsimStrategy(
            partition_of=partition_of, mode=run.fl.mode, lr=run.fl.lr, seed=run.seed,
            clients_per_round=run.fl.clients_per_round,
            buffers=[name for name in server_model.state_dict() if name not in parameters])
        strategy = defense.wrap_strategy(sampler)
        threat = threat_model(run, bundle)
        sample_rate = (run.fl.clients_per_round or run.fl.clients) / run.fl.clients
        eval_model = model_fn()
        last: dict = {}
        round_started = [time.perf_counter()]
        evaluated: dict[int, tuple[ArrayRecord, float, float]] = {}

        def usable(server_round: int, arrays: ArrayRecord) -> str | None:
            """A new global model whose test loss is not finite (finite weights too large to use) is refused."""
            eval_model.load_state_dict(arrays.to_torch_state_dict())
            accuracy, loss = evaluate(eval_model, bundle.test_x, bundle.test_y)
            if not math.isfinite(loss):
                return f"the new global model's test loss is {loss}"
            evaluated[server_round] = (arrays, accuracy, loss)
            return None

        hook = CuriousStrategy(strategy, [attack], model_fn, threat, targets=run.targets.targets,
                               sample=run.targets.sample, rounds=run.targets.rounds, seed=run.seed, recorder=recorder,
                               min_clients=run.fl.min_clients, client_of_node=partition_of, view=defense.observe,
                               max_ratio=run.fl.max_norm_ratio, check_aggregate=usable,
                               scorer=make_scorer(run.metrics.recovered_ssim),
                               partitions=partition_inputs(bundle, run))

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            checked = evaluated.pop(server_round, None)
            if checked is not None and checked[0] is arrays:  # evaluated when it was checked
                accuracy, loss = checked[1], checked[2]
            else:
                eval_model.load_state_dict(arrays.to_torch_state_dict())
                accuracy, loss = evaluate(eval_model, bundle.test_x, bundle.test_y)
            row = {"accuracy": accuracy, "loss": loss,
                   "seconds": time.perf_counter() - round_started[0],
                   **defense.privacy(server_round, sample_rate, releases=sampler.most_rounds())}
            recorder.on_evaluate(server_round, row)
            last.clear()
            last.update(round=server_round, **row)
            round_started[0] = time.perf_counter()
            return MetricRecord({"accuracy": accuracy, "loss": loss})

        console.start()
        train_config = ConfigRecord({CONFIG_KEY: config_yaml, AUDIT_FLAG: bool(run.audit)})
        hook.start(grid, ArrayRecord(model_fn().state_dict()), num_rounds=run.fl.rounds, timeout=run.fl.timeout,
                   train_config=train_config, evaluate_fn=evaluate_fn)
        problem = _untrained(hook, run.fl.rounds)
        if problem is not None:
            raise RunUnusable(problem)
    except BaseException as err:
        state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        writer.finish(state, error=f"{type(err).__name__}: {err}")
        console.finish(str(writer.dir), state)
        raise
    writer.finish("complete")
    console.finish(str(writer.dir), "complete")
    return last


def partition_inputs(bundle: Any, run: RunConfig):
    """client id -> its training partition's inputs (model space), for the scorer's `identified`; the aggregate's
    pseudo-client gets every client's. The same split the clients make (`fedsim.client_app.ClientPlan`)."""
    parts = [torch.as_tensor(p) for p in partition(bundle.train_y, run.fl.clients, run.partition, run.seed)]

    def inputs(client: int):
        if client == AGGREGATE_CLIENT:
            return bundle.train_x[torch.cat(parts)]
        return bundle.train_x[parts[client]] if 0 <= client < len(parts) else None

    return inputs


class RunUnusable(FedsimError):
    """The federation ran to its end, but its model is not a result: no round trained, or rounds were rejected."""


def _untrained(hook: CuriousStrategy, rounds: int) -> str | None:
    if hook.rounds_rejected:
        return (f"the new global model was not finite (or its loss was not) in rounds {hook.rounds_rejected}; "
                f"the previous model was kept; {len(hook.rounds_trained)} of {rounds} rounds trained")
    if not hook.rounds_trained:
        return f"no round trained: all {rounds} rounds were skipped (see 'skipped' and the faults in the results)"
    return None


def _prefixed(strength: Mapping[str, float]) -> dict:
    return {f"defense_{k}": v for k, v in strength.items()}


def _shippable(raw: Mapping[str, Any]) -> dict:
    """The config clients receive: everything but Hydra's own node and what the nodes hold of their own."""
    return {k: v for k, v in raw.items() if k not in ("hydra", "nodes")}


def _grid_rounds(run) -> tuple[int, int] | None:
    """The first and the last round the schedule attacks (`attack.rounds`), whose grids the run draws."""
    chosen = AttackSchedule.parse(run.targets.rounds, "attack.rounds", run.fl.rounds).resolve(run.fl.rounds)
    return (min(chosen), max(chosen)) if chosen else None
