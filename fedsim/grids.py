"""A Flower Grid that wraps another: the base of fedsim's grid layers (fault injection, SecAgg+, audit taps)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

LATE_REASON = "no reply within the round's timeout"


class WrappedGrid(Grid):
    """Delegates every call to `inner`; replies pass through `on_replies`, which subclasses override."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.on_replies(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.on_replies(self.inner.send_and_receive(messages, timeout=timeout))

    def on_replies(self, replies: Iterable[Message]) -> Iterable[Message]:
        return replies


def late_reply(instruction: Message, timeout: float) -> Message:
    """The error reply that stands for a client's reply not received within `timeout` seconds."""
    return Message(Error(code=ErrorCode.REPLY_MESSAGE_UNAVAILABLE, reason=f"{LATE_REASON} ({timeout:g} s)"),
                   reply_to=instruction)


def is_late(reply: Message) -> bool:
    return reply.has_error() and reply.error.code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE \
        and reply.error.reason.startswith(LATE_REASON)


class TimeoutGrid(WrappedGrid):
    """Every node sent a message gets a reply within the timeout: a missing one becomes a `late_reply`, so the
    server records a timeout (not a dropout) for a client that was too slow, on any runtime."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        started = time.monotonic()
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        if timeout is None or time.monotonic() - started < timeout:
            return replies  # every reply came (or the grid gave up early: those are not late, just missing)
        answered = {r.metadata.src_node_id for r in replies}
        return replies + [late_reply(m, timeout) for m in messages if m.metadata.dst_node_id not in answered]
