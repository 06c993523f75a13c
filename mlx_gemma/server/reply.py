"""The one generation path every protocol shares: a `Request` goes to the engine, and its
events come back as the protocols need them: thought text, answer text cut at stop strings,
whole tool calls parsed out of the text, logprobs, and at the end the `Reply` with its usage.
A request for n replies (Chat Completions' `n`) comes back as n such streams, told apart by
their index."""

import asyncio
import time
from typing import AsyncIterator, Awaitable, Callable, Optional

from .engine import Engine
from .job import Cancelled, Job
from .media import remove_files
from .request import Reply, Request
from .tools import take_calls


POLL_SECONDS = 0.2  # how often a waiting (non-streaming) client is checked for a hang-up


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back what may begin one."""

    def __init__(self, stops: list):
        self.stops, self.held, self.stopped = stops, "", None

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        text = self.held + text
        found = [(i, s) for s in self.stops for i in [text.find(s)] if i >= 0]
        if found:
            cut, self.stopped = min(found)
            self.held = ""
            return text[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class Choice:
    """One reply as its engine events arrive: its stop strings, the text held back while a tool
    call may be starting, and its `Reply`. `over` once the reply has ended."""

    def __init__(self, request: Request, reply: Reply):
        self.request, self.reply = request, reply
        self.stops, self.held, self.over = StopMatcher(request.stop), "", False

    def feed(self, event: tuple) -> list:
        """[(kind, value)] that one "text" or "done" event gives (see `Generation.events`)."""
        r, reply, out = self.request, self.reply, []
        if event[0] == "done":
            _, _, reply.finish, reply.generated, reply.reasoning_tokens, reply.drafted, reply.accepted = event
            text = self.held + self.stops.flush()
            if text:  # an unfinished call is text after all
                reply.text += text
                out.append(("text", text))
            return self._end(out)
        _, _, text, thinking, reply.generated, entry = event
        if entry is not None:
            reply.logprobs.append(entry)
            out.append(("logprob", entry))
        if thinking:
            reply.reasoning += text
            out.append(("reasoning", text))
            return out
        text, calls = self.stops.feed(text), []
        if r.tools:  # a call goes out whole, once its end marker has arrived
            text, calls, self.held = take_calls(self.held + text)
        if text:
            reply.text += text
            out.append(("text", text))
        for call in calls[:1] if not r.parallel_tool_calls else calls:
            reply.calls.append(call)
            out.append(("call", call))
        if self.stops.stopped or (reply.calls and not r.parallel_tool_calls):
            reply.finish, reply.stop_sequence = ("stop_sequence", self.stops.stopped) if self.stops.stopped \
                else ("stop", None)
            return self._end(out)
        return out

    def _end(self, out: list) -> list:
        if self.reply.calls:
            self.reply.finish = "tool_calls"
        self.over = True
        return out


class Generation:
    """One request's run. `start()` queues it and waits for its prompt to be read (so errors in
    the prompt come before any response is sent); then either `events()` streams it (`choices()`
    when it has several replies) or `collect()` gathers it. `usage` (the request's log line) is
    filled in as it goes.

    A client that goes away stops the run within a step: a streamed reply is cancelled by the
    server itself, a waiting one is noticed by polling `is_disconnected`."""

    def __init__(self, engine: Engine, kind: str, request: Request,
                 is_disconnected: Callable[[], Awaitable[bool]], usage: dict):
        self.engine, self.request, self.usage = engine, request, usage
        self.is_disconnected = is_disconnected
        self.job = Job(kind, request, asyncio.get_running_loop(), asyncio.Queue())
        self.streaming, self.polled = False, time.monotonic()
        self.replies = [Reply() for _ in range(request.n)]  # one per choice (`n`)
        self.reply = self.replies[0]

    async def _next(self):
        while True:
            # Polled on a clock, not only when no event comes: tokens arrive faster than any timeout.
            if not self.streaming and time.monotonic() - self.polled > POLL_SECONDS:
                self.polled = time.monotonic()
                if await self.is_disconnected():
                    self.job.cancelled.set()
                    raise Cancelled()
            try:
                event = await asyncio.wait_for(self.job.events.get(), timeout=POLL_SECONDS)
            except asyncio.TimeoutError:
                continue
            if event[0] == "error":
                raise event[1]
            return event

    async def start(self) -> Reply:
        try:
            self.engine.submit(self.job)
        except Exception:  # a full queue: the uploads go now, nobody else will remove them
            remove_files(self.request.temp_files)
            raise
        try:
            event = await self._next()
        except BaseException:
            self.job.cancelled.set()
            raise
        if event[0] == "count":
            self.reply.prompt_tokens = event[1]
            return self.reply
        for reply in self.replies:  # the prompt, prefilled once, is every choice's
            reply.prompt_tokens, reply.cached_tokens = event[1]["prompt_tokens"], event[1]["cached_tokens"]
        self.usage.update(prompt=self.reply.prompt_tokens, cached=self.reply.cached_tokens)
        return self.reply

    async def choices(self) -> AsyncIterator[tuple]:
        """(index, kind, value) of every reply, the kinds as `events` gives them, then (index,
        "end", its finished `Reply`) once that reply is over; until every reply is. A reply that
        ends (a stop string) stops its sequence alone; the run stops when this generator is closed."""
        choices = [Choice(self.request, reply) for reply in self.replies]
        try:
            while not all(c.over for c in choices):
                event = await self._next()
                index = event[1]
                choice = choices[index]
                if choice.over:  # what the engine sent before it saw this reply end
                    continue
                for kind, value in choice.feed(event):
                    yield index, kind, value
                if choice.over:
                    self.job.ended[index].set()
                    yield index, "end", choice.reply
            self.usage["generated"] = sum(reply.generated for reply in self.replies)
        finally:
            self.job.cancelled.set()  # the reply is over or the client is gone: free the worker

    async def events(self) -> AsyncIterator[tuple]:
        """("reasoning", text), ("text", text), ("call", call), ("logprob", entry) until the
        reply ends; the finished `Reply` is then in `self.reply`. For requests of one reply
        (what Responses and Messages send). The run stops when this generator is closed."""
        inner = self.choices()
        try:
            async for _, kind, value in inner:
                if kind != "end":
                    yield kind, value
        finally:
            await inner.aclose()

    async def collect(self) -> Reply:
        """Every reply, gathered: the first is returned, all are in `self.replies`."""
        async for _ in self.choices():
            pass
        return self.reply

    def begin_stream(self) -> None:
        """From here the server notices a hang-up itself (and cancels the stream)."""
        self.streaming = True
        self.usage["streaming"] = True


async def run(engine: Engine, kind: str, request: Request, http_request, stream: bool) -> Optional[Generation]:
    """A started `Generation` for a FastAPI request (None: the client hung up while it waited)."""
    generation = Generation(engine, kind, request, http_request.is_disconnected, http_request.state.usage)
    try:
        await generation.start()
    except Cancelled:
        return None
    if stream:
        generation.begin_stream()
    return generation
