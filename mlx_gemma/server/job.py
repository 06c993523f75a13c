"""A request as the engine runs it: its events back to the HTTP side, and its cancellation."""

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Optional

from .request import Request

STOP = object()  # queued by `close`


class Cancelled(Exception):
    """The client went away; raised inside a prefill to stop it between chunks."""


@dataclass
class Job:
    """`kind`: "chat" (messages through the template), "completion" (a raw prompt) or "count"
    (the prompt's tokens only). Events: ("start", info), ("text", index, text, thinking, generated,
    logprob entry), ("done", index, finish, generated, thought tokens, drafted, accepted), ("count",
    n), ("error", ApiError); `index` is the reply's, 0 to request.n - 1. `cancelled` stops them all,
    `ended[i]` reply i alone (a stop string ended it). `answered`: its last event was sent."""

    kind: str
    request: Request
    loop: Optional[asyncio.AbstractEventLoop] = None
    events: Optional[asyncio.Queue] = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    inputs: object = None  # the prompt, read once (a job may wait for admission)
    ended: list = field(init=False)
    answered: bool = field(init=False, default=False)
    replies_done: int = field(init=False, default=0)

    def __post_init__(self):
        self.ended = [threading.Event() for _ in range(self.request.n)]

    def emit(self, *event) -> None:
        self.replies_done += event[0] == "done"
        self.answered |= event[0] in ("error", "count") or self.replies_done == self.request.n
        if self.loop is None:  # a follower rank's copy of the job: rank 0 answers
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is stopping
            self.cancelled.set()
