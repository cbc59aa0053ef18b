"""Typed, validated configuration.

Hydra composes a DictConfig from `conf/`; `validate` turns it into frozen dataclasses, checking every value at the
door. A bad value raises `ConfigError(key, value, allowed)`, which the CLI prints as one line before any work.
Plug-ins (attacks, defenses, datasets, models) declare their knobs as a dataclass built with `knob(...)`, and
`build_config` checks a YAML node against it.
"""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fedsim.errors import ConfigError
from fedsim.schedule import AttackSchedule

T = TypeVar("T")

_MISSING = dataclasses.MISSING
_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def knob(
    default: Any = _MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    help: str = "",
) -> Any:
    """A dataclass field with range/choice constraints checked by `build_config`."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "help": help}
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; returns the value converted (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(key, value, " or ".join(_type_name(a) for a in args))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, f"a list ({_type_name(tp)})")
        item = args[0] if args else Any
        items = [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, "a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, value, "a string")
    return value


def _check_range(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(key, value, "one of " + ", ".join(str(c) for c in choices))
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for name, (compare, sign) in _BOUNDS.items():
        bound = meta.get(name)
        if bound is not None and not compare(value, bound):
            raise ConfigError(key, value, f"a number {sign} {bound}")


def build_config(cls: type[T], node: Any, prefix: str, *, ignore: tuple[str, ...] = ()) -> T:
    """Build the dataclass `cls` from a config node, checking keys, types and ranges.

    `prefix` is the dotted config path of the node (for error messages); keys in `ignore` are skipped.
    """
    values = _plain(node) or {}
    if not isinstance(values, Mapping):
        raise ConfigError(prefix, values, "a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name in ignore:
            continue
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            allowed = ", ".join(sorted(n for n in fields if n not in ignore))
            raise ConfigError(key, value, f"a known key of {prefix or 'the config'} ({allowed})")
        converted = _coerce(key, value, hints[name])
        _check_range(key, converted, fields[name].metadata)
        kwargs[name] = converted
    for name, f in fields.items():
        if name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING:  # type: ignore[misc]
            raise ConfigError(f"{prefix}.{name}" if prefix else name, None, "a value (this key is required)")
    return cls(**kwargs)


def knobs_of(cls: type) -> dict[str, dict[str, Any]]:
    """The knobs of a config dataclass with default and help text (for docs and `fedsim --help`)."""
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)  # type: ignore[misc]
        out[f.name] = {"default": default, "help": f.metadata.get("help", "")}
    return out


def to_dict(obj: Any) -> Any:
    """Dataclass (possibly nested) -> plain dict, for writing into results."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


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
    from attacks.base import build_attack
    from defenses.base import build_defense
    from fedsim.data import data_config
    from fedsim.data.partition import partition_config
    from fedsim.faults import fault_config
    from fedsim.models import model_config
    from fedsim.runtime import nodes_config, runtime_config
    from fedsim.threads import check_threads

    raw = _plain(cfg)
    if not isinstance(raw, Mapping):
        raise ConfigError("config", raw, "a mapping")
    known = {"seed", "fl", "partition", "threat", "output", "faults", "audit", "verbose", "data", "model", "attack",
             "defense", "runtime", "nodes", "hydra", "experiment", "study", "tracking", "metrics", "threads"}
    for key in raw:
        if key not in known:
            raise ConfigError(str(key), raw[key], f"a known key ({', '.join(sorted(known - {'hydra'}))})")
    seed = _coerce("seed", raw.get("seed", 0), int)
    threat_node = _plain(raw.get("threat")) or {}
    if isinstance(threat_node, Mapping) and "buffers" in threat_node:
        raise ConfigError("threat.buffers", threat_node["buffers"],
                          "no such key: the server always sees the BatchNorm statistics clients send; to keep them "
                          "on the clients set fl.send_buffers=false")
    _check_range("seed", seed, {"ge": 0, "lt": 2**63})
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
        audit=_audit(raw), verbose=_coerce("verbose", raw.get("verbose", False), bool),
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
    from fedsim.runtime import RUNTIMES

    value = _coerce("audit", raw.get("audit"), bool | None)
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
    from fedsim.data import load_dataset
    from fedsim.data.partition import partition
    from fedsim.models import build_model
    from defenses.base import build_defense

    bundle = load_dataset(run.data)
    parts = partition(bundle.train_y, run.fl.clients, run.partition, run.seed)
    smallest = min(len(p) for p in parts)
    if run.fl.batch_size > smallest:
        raise ConfigError("fl.batch_size", run.fl.batch_size,
                          f"at most {smallest} (the smallest client's data with fl.clients={run.fl.clients})")
    model = build_model(run.model, bundle.input_shape, bundle.num_classes, run.seed)
    model = build_defense(run.defense).build_model(model, private=False)  # the model the server holds
    attack.check(model, threat_meta(run, bundle))


def threat_meta(run: RunConfig, bundle: Any) -> Any:
    """The TrainMeta template the threat model grants for this run (per-observation fields left empty)."""
    from fedsim.threat import TrainMeta

    t = run.threat
    return TrainMeta(
        mode=run.fl.mode, input_shape=bundle.input_shape, num_classes=bundle.num_classes,
        normalization=bundle.normalization,
        batch_size=run.fl.batch_size if t.batch_size else None,
        local_steps=(1 if run.fl.mode == "fedsgd" else run.fl.local_steps) if t.local_steps else None,
        lr=run.fl.lr if t.lr else None,
    )
