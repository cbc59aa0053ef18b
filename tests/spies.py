"""A test attack that keeps every update the curious server hands to attacks (`attack.name=spy_updates`).

Imported as `tests.spies` by every test that uses it, so it is registered once.
"""

from fedsim.attacks.base import Attack, register_attack
from fedsim.threat import Reconstruction

SEEN: list[tuple[int, int, dict, int | None]] = []   # (round, client, update, batch size granted)


@register_attack("spy_updates")
class SpyUpdates(Attack):
    name = "spy_updates"

    def reconstruct(self, obs):
        SEEN.append((obs.round, obs.client, {k: v.clone() for k, v in obs.update.items()}, obs.meta.batch_size))
        return Reconstruction(inputs=None)


BUFFERS_SEEN: list[tuple[int, int, dict]] = []   # (round, client, buffers the observation holds)


@register_attack("spy_buffers")
class SpyBuffers(Attack):
    name = "spy_buffers"

    def reconstruct(self, obs):
        BUFFERS_SEEN.append((obs.round, obs.client, {k: v.clone() for k, v in obs.buffers.items()}))
        return Reconstruction(inputs=None)
