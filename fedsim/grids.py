"""A Flower Grid that wraps another: the base of fedsim's grid layers (fault injection, SecAgg+, audit taps)."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


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
