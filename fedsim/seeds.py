"""Seeds and the tags of fedsim's random streams.

Every random draw of a run comes from a stream seeded by (run seed, round, client, tag): `seed_for` mixes the
integers into an independent 63-bit seed, and the tag names the stream so that two uses never share one. The tags
are values of existing runs: changing one changes every result drawn from it.

Core layer: imports nothing of fedsim.
"""

from __future__ import annotations

import numpy as np

# (seed, round, client, tag) streams, `seed_for`
TRAIN_STREAM = None           # local training's batches: (seed, round, client) with no tag
DEFENSE_STREAM = 0xDEF        # a defense's randomness on the client (noise, ...): DefenseContext.generator
FAULT_STREAM = 0xFA17         # whether and how a client misbehaves (faults.*)
SECAGG_ROUNDING_STREAM = 7    # Flower's SecAgg+ stochastic rounding (numpy's global generator, seeded per stage)
KEYLOCK_KEY_STREAM = 0x10C4   # a client's key-lock key and lock layers: (node key seed, client, tag)
KEYLOCK_SERVER_STREAM = 0x5E4C  # the server's own random lock: (key_seed, tag)
# numpy generators seeded with [seed, round, tag]
SAMPLE_CLIENTS_STREAM = 0x5E  # which clients train in a round (fl.clients_per_round)
SAMPLE_TARGETS_STREAM = 0x5A  # which targeted replies are attacked in a round (attack.sample)


def seed_for(*parts: int | None) -> int:
    """A 63-bit seed derived from integers (seed, round, client, ...): independent streams per tuple. A `None`
    part (an untagged stream) is left out."""
    ints = [int(p) for p in parts if p is not None]
    return int(np.random.SeedSequence(ints).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def round_rng(seed: int, server_round: int, stream: int) -> np.random.Generator:
    """numpy's generator for a per-round draw of the server (`SAMPLE_*_STREAM`)."""
    return np.random.default_rng([seed, server_round, stream])
