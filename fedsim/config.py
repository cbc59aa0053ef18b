"""Typed, validated configuration of one run.

Hydra composes a DictConfig from `conf/`; `validate` turns it into frozen dataclasses, checking every value at the
door. A bad value raises `ConfigError(key, value, allowed)`, which the CLI prints as one line before any work.
Plug-ins (attacks, defenses, datasets, models) declare their knobs as a dataclass built with `knob(...)`, and
`build_config` checks a YAML node against it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedsim.attacks.base import build_attack
from fedsim.defenses.base import build_defense
from fedsim.data import data_config, load_dataset
from fedsim.data.partition import partition, partition_config
from fedsim.errors import ConfigError
from fedsim.faults import fault_config
from fedsim.hook import ThreatModel
from fedsim.models import build_model, model_config
from fedsim.registry import Registry
from fedsim.schedule import AttackSchedule
from fedsim.schema import build_config, check_range, coerce, knob, plain
from fedsim.threads import check_threads
from fedsim.threat import TrainMeta

# --- runtimes: where the apps run (registered by fedsim.runtime and fedsim.deployment) ---------------------------

@dataclass(frozen=True)
class RuntimeSpec:
    Config: type
    launch: Callable[..., None]
    simulated: bool = True     # clients are virtual nodes this process creates (the default of `audit`)


RUNTIMES: Registry[RuntimeSpec] = Registry("runtime", modules=("fedsim.runtime", "fedsim.deployment"),
                                              default="inline")


def register_runtime(name: str, config: type, *, simulated: bool = True):
    def decorator(fn):
        RUNTIMES.register(name)(RuntimeSpec(config, fn, simulated))
        return fn

    return decorator


def runtime_config(node: Any) -> tuple[str, Any]:
    name, _, config = RUNTIMES.build(node, "runtime")
    return name, config


# --- what each simulated SuperNode holds of its own (`nodes.*`) ---------------------------------------------------

@dataclass(frozen=True)
class NodesConfig:
    """What the simulated SuperNodes hold of their own (`nodes.*`). The server never sends it: it is not in the
    configuration clients receive, as a real SuperNode's `--node-config` is not."""

    key_seed: int | None = knob(0, ge=0, help="seed of the nodes' private key-lock keys (each node mixes in its "
                                              "partition id; reproducible runs); null: each node draws its own "
                                              "from OS randomness")


def nodes_config(node: Any) -> NodesConfig:
    return build_config(NodesConfig, plain(node) or {}, "nodes")


# --- the run configuration ---------------------------------------------------------------------------------------

MODES = ("fedsgd", "fedavg")


@dataclass(frozen=True)
class FLConfig:
    clients: int = knob(4, ge=1, help="number of clients (SuperNodes), one data partition each")
    rounds: int = knob(3, ge=1, help="federated rounds")
    clients_per_round: int | None = knob(None, ge=1, help="clients sampled per round (None: all)")
    batch_size: int = knob(8, ge=1, help="samples per local step")
    mode: str = knob("fedsgd", choices=MODES, help="fedsgd: one batch, the gradient is the update; "
                                                     "fedavg: local SGD steps, the weight delta is the update")
    local_steps: int = knob(1, ge=1, help="SGD steps per round in fedavg")
    lr: float = knob(0.1, gt=0.0, help="learning rate (client SGD in fedavg, server step in fedsgd)")
    min_clients: int = knob(1, ge=1, help="a round with fewer healthy replies is skipped")
    timeout: float = knob(600.0, gt=0.0, help="seconds the server waits for a round's replies; a later reply is a "
                                              "timeout fault, left out")
    discovery_timeout: float = knob(300.0, gt=0.0, help="seconds the server waits at the start for every client "
                                                        "to connect and report its partition")
    max_norm_ratio: float = knob(1e6, gt=1.0, help="a reply whose norm exceeds this many times the larger of the "
                                                   "round's median reply norm and the model's norm (or whose "
                                                   "num-examples exceeds this many times the median) is rejected")
    send_buffers: bool = knob(True, help="clients send their BatchNorm statistics with the update (false: they stay "
                                         "on the client, FedBN-style, and the server keeps its own)")


@dataclass(frozen=True)
class ThreatConfig:
    """Training facts the honest-but-curious server is granted (it set these itself, so all but labels default to
    true). Data a client sends is never hidden from it: what is sent is set on the client (`fl.send_buffers`)."""

    batch_size: bool = knob(True, help="the attacker knows the client batch size")
    local_steps: bool = knob(True, help="the attacker knows the number of local steps")
    lr: bool = knob(True, help="the attacker knows the client learning rate")
    labels: bool = knob(False, help="the attacker is given the true labels")


@dataclass(frozen=True)
class AttackTargets:
    targets: Any = knob("all", help="clients to attack: all, N (the first N), or a list of client ids")
    sample: int | None = knob(None, ge=1, help="attack at most this many of the targeted replies per round")
    rounds: Any = knob("all", help="rounds to attack: all, first, middle, last, a list such as [first,last] or "
                                   "[1,10], or {every: k} (fedsim.schedule)")


@dataclass(frozen=True)
class MetricsConfig:
    recovered_ssim: float = knob(0.9, ge=0.0, le=1.0, help="SSIM at or above which a sample counts as recovered")


@dataclass(frozen=True)
class OutputConfig:
    grid_clients: int = knob(2, ge=0, help="image grids for this many clients in the first and last round")
    grid_every_round: bool = knob(False, help="grids in every round, not only the first and last")


@dataclass(frozen=True)
class RunConfig:
    """The whole validated configuration of one run. Plug-in nodes stay raw (dicts) and are built by name."""

    seed: int
    fl: FLConfig
    partition: Any
    threat: ThreatConfig
    targets: AttackTargets
    output: OutputConfig
    faults: Any
    audit: bool
    verbose: bool
    data: dict
    model: dict
    attack: dict
    defense: dict
    runtime: dict
    raw: dict = field(repr=False, default_factory=dict)
    metrics: MetricsConfig = MetricsConfig()
    nodes: Any = None            # fedsim.runtime.NodesConfig: what simulated nodes hold of their own
    threads: int | None = None   # torch threads of the server's compute (fedsim.threads); None: automatic


def validate(cfg: Any, *, deep: bool = True) -> RunConfig:
    """Check every value of a composed config. `deep` also loads the data and checks the attack on the model.

    Raises ConfigError (or AttackNotApplicable / DatasetNotFound) with a one-line message.
    """
    raw = plain(cfg)
    if not isinstance(raw, Mapping):
        raise ConfigError("config", raw, "a mapping")
    known = {"seed", "fl", "partition", "threat", "output", "faults", "audit", "verbose", "data", "model", "attack",
             "defense", "runtime", "nodes", "hydra", "experiment", "study", "tracking", "metrics", "threads"}
    for key in raw:
        if key not in known:
            raise ConfigError(str(key), raw[key], f"a known key ({', '.join(sorted(known - {'hydra'}))})")
    seed = coerce("seed", raw.get("seed", 0), int)
    threat_node = plain(raw.get("threat")) or {}
    if isinstance(threat_node, Mapping) and "buffers" in threat_node:
        raise ConfigError("threat.buffers", threat_node["buffers"],
                          "no such key: the server always sees the BatchNorm statistics clients send; to keep them "
                          "on the clients set fl.send_buffers=false")
    check_range("seed", seed, {"ge": 0, "lt": 2**63})
    fl = build_config(FLConfig, raw.get("fl"), "fl")
    if fl.clients_per_round is not None and fl.clients_per_round > fl.clients:
        raise ConfigError("fl.clients_per_round", fl.clients_per_round, f"at most fl.clients={fl.clients}")
    if fl.min_clients > (fl.clients_per_round or fl.clients):
        raise ConfigError("fl.min_clients", fl.min_clients, f"at most the clients per round ({fl.clients_per_round or fl.clients})")
    attack_node = dict(raw.get("attack") or {})
    targets = build_config(AttackTargets, {k: attack_node[k] for k in ("targets", "sample", "rounds")
                                           if k in attack_node}, "attack")
    _check_targets(targets.targets, fl.clients)
    AttackSchedule.parse(targets.rounds, "attack.rounds", fl.rounds)
    run = RunConfig(
        seed=seed, fl=fl, partition=partition_config(raw.get("partition")),
        threat=build_config(ThreatConfig, raw.get("threat"), "threat"), targets=targets,
        output=build_config(OutputConfig, raw.get("output"), "output"), faults=fault_config(raw.get("faults")),
        audit=_audit(raw), verbose=coerce("verbose", raw.get("verbose", False), bool),
        data=dict(raw.get("data") or {}), model=dict(raw.get("model") or {}), attack=attack_node,
        defense=dict(raw.get("defense") or {"name": "none"}), runtime=dict(raw.get("runtime") or {"name": "inline"}),
        raw=dict(raw), metrics=build_config(MetricsConfig, raw.get("metrics"), "metrics"),
        nodes=nodes_config(raw.get("nodes")), threads=check_threads(raw.get("threads")),
    )
    data_config(run.data)
    model_config(run.model)
    runtime_config(run.runtime)
    attack = build_attack(run.attack)
    build_defense(run.defense).check_run(run)
    if deep:
        _deep_checks(run, attack)
    return run


def _audit(raw: Mapping[str, Any]) -> bool:
    """`audit: null` means the runtime's default: on in simulation, off on a real federation (deployment)."""
    value = coerce("audit", raw.get("audit"), bool | None)
    if value is not None:
        return value
    name = dict(raw.get("runtime") or {}).get("name", "inline")
    return RUNTIMES.get(name, key="runtime.name").simulated if name in RUNTIMES else True


def _check_targets(targets: Any, clients: int) -> None:
    if targets == "all":
        return
    if isinstance(targets, int) and not isinstance(targets, bool):
        if not 1 <= targets <= clients:
            raise ConfigError("attack.targets", targets, f"all, a count between 1 and fl.clients={clients}, or a list of ids")
        return
    if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, int) and 0 <= t < clients for t in targets):
        return
    raise ConfigError("attack.targets", targets, f"all, a count N, or a list of client ids in 0..{clients - 1}")


def _deep_checks(run: RunConfig, attack: Any) -> None:
    """Checks that need the data and the model: batch size against partitions, the attack against the model."""
    bundle = load_dataset(run.data)
    parts = partition(bundle.train_y, run.fl.clients, run.partition, run.seed)
    smallest = min(len(p) for p in parts)
    if run.fl.batch_size > smallest:
        raise ConfigError("fl.batch_size", run.fl.batch_size,
                          f"at most {smallest} (the smallest client's data with fl.clients={run.fl.clients})")
    model = build_model(run.model, bundle.input_shape, bundle.num_classes, run.seed)
    model = build_defense(run.defense).build_model(model, private=False)  # the model the server holds
    attack.check(model, threat_meta(run, bundle))


def threat_model(run: RunConfig, bundle: Any) -> ThreatModel:
    """What the run's `threat` grants the curious server, in the hook's terms (the one place that reads it)."""
    t = run.threat
    return ThreatModel(
        mode=run.fl.mode, batch_size=run.fl.batch_size if t.batch_size else None,
        local_steps=run.fl.local_steps if t.local_steps else None, lr=run.fl.lr if t.lr else None,
        input_shape=bundle.input_shape, num_classes=bundle.num_classes, normalization=bundle.normalization,
        grant_labels=t.labels)


def threat_meta(run: RunConfig, bundle: Any) -> TrainMeta:
    """The TrainMeta template the threat model grants for this run (per-observation fields left empty)."""
    return threat_model(run, bundle).meta(run.fl.mode, bundle.input_shape, bundle.num_classes)
