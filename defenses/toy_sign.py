"""A toy defense with a client side only (`defense=toy_sign`): the client sends the sign of each value of its update.

It exists to show that a defense with a client mod is one module, one YAML and one test: `client_mods` declares
the mod and where it sits; the client app composes it.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, MessageType

from defenses.base import ClientMod, Defense, register_defense


def sign_mod(msg, context, call_next, client) -> Message:
    out = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or out.has_error():
        return out
    sent = out.content["arrays"].to_torch_state_dict()
    out.content["arrays"] = ArrayRecord({k: v.sign() if v.is_floating_point() else v for k, v in sent.items()})
    return out


@register_defense("toy_sign")
class ToySign(Defense):
    name = "toy_sign"

    def client_mods(self) -> list[ClientMod]:
        return [ClientMod("model", sign_mod)]
