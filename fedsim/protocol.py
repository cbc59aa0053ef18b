"""The wire protocol: the record keys, run-config keys and node-config keys fedsim's apps, defenses and runtimes
share, and the audit codec (a client's true batch, for the scorer only).

Core layer (as Flower keeps the keys its DP wrappers and mods share in a neutral constants module): the client
and server apps, the hook, the defenses' client mods and the runtimes all import this module; it imports none of
them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from torch import Tensor

# --- records in messages -------------------------------------------------------------------------------------------
AUDIT_KEY = "fedsim.audit"    # ConfigRecord with the client's true batch (simulation only)
CLIENT_KEY = "fedsim.client"  # ConfigRecord with the client's partition id and the names of its buffers
GRANT_KEY = "fedsim.grant"    # ConfigRecord with defense secrets the threat model grants the attacker (simulation)
AGGREGATE_KEY = "fedsim.aggregate"  # ConfigRecord on replies that carry a secure aggregate, not one client's update
AGGREGATE_CLIENT = -1         # the client id under which attacks on an aggregate are recorded

# --- in the train ConfigRecord -------------------------------------------------------------------------------------
CONFIG_KEY = "fedsim.config"  # the run's config as YAML
AUDIT_FLAG = "fedsim.audit"   # the server asks for the batch (for the scorer)
ROUND_KEY = "server-round"    # Flower's own: the round an instruction belongs to

# --- the ServerApp's run config (what `flwr run --run-config` and the simulation runtimes pass) ---------------------
RUN_CONFIG_KEY = "fedsim-config"    # the composed Hydra config (YAML)
OUTPUT_KEY = "fedsim-output"        # the run directory
PROGRESS_KEY = "fedsim-progress"    # per-round lines from the ServerApp

# --- a node's own config (a SuperNode operator's --node-config; set by the simulation runtimes) ----------------------
PARTITION_KEY = "partition-id"
PARTITIONS_KEY = "num-partitions"
CONSENT_KEY = "fedsim-audit"        # this node's operator lets its true batches go to the scorer
KEY_SEED = "fedsim-key-seed"        # seed of this node's private key-lock key (never sent by the server)
SIMULATED_KEY = "fedsim-simulated"  # set by fedsim's in-process runtime on its virtual nodes: a simulation


def partition_id(context: Context) -> int:
    """The data partition this node holds (its operator's node config, or the simulation's)."""
    if PARTITION_KEY not in context.node_config:
        raise KeyError("this SuperNode has no partition-id in its node config (start it with "
                       "--node-config 'partition-id=N num-partitions=M')")
    return int(context.node_config[PARTITION_KEY])


def _flag(value: object) -> bool:
    return value is True or str(value).lower() == "true"


def in_simulation(context: Context | None = None) -> bool:
    """True on a virtual node: one of fedsim's in-process runtime (its node config says so) or a Ray simulation
    actor; False on a real SuperNode."""
    if context is not None and _flag(context.node_config.get(SIMULATED_KEY, False)):
        return True
    ray = sys.modules.get("ray")  # asked only when Ray runs in this process; never imported here
    try:
        return bool(ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id())
    except Exception:
        return False


def may_audit(context: Context) -> bool:
    """Whether this node may send its true batch (or a defense's secrets) to the scorer: it is simulated (its data
    belongs to whoever runs the simulation), or its operator said so in its node config (`fedsim-audit=true`)."""
    return _flag(context.node_config.get(CONSENT_KEY, False)) or in_simulation(context)


# --- the audit codec: ground truth for the scorer only ---------------------------------------------------------------

@dataclass(frozen=True)
class GroundTruth:
    """The samples a client trained on this round. inputs: (b, *shape) in model space; labels: (b,).

    partition: (N, *shape), model space: the client's whole training partition (it holds the batch), when the
    server side of the simulation knows it; the scorer's reference for `identified`.
    """

    inputs: Tensor
    labels: Tensor
    partition: Tensor | None = None


class AuditFailed(Exception):
    """A client's audit mod could not capture its batch (the client trained and replied all the same)."""


def audit_record(inputs: Tensor, labels: Tensor) -> ConfigRecord:
    """Pack a client's batch for the audit channel (float32 bytes + shape + labels)."""
    x = inputs.detach().cpu().float().contiguous()
    return ConfigRecord({"x": x.numpy().tobytes(), "x_shape": list(x.shape), "y": labels.cpu().tolist()})


def read_audit(record: ConfigRecord) -> GroundTruth:
    """The batch in an audit record (`AuditFailed` when the client could not capture it: the reason)."""
    if "error" in record:
        raise AuditFailed(str(record["error"]))
    shape = tuple(int(s) for s in record["x_shape"])
    x = torch.from_numpy(np.frombuffer(record["x"], dtype=np.float32).copy()).reshape(shape)
    return GroundTruth(x, torch.tensor(list(record["y"]), dtype=torch.int64))
