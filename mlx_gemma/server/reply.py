"""The one generation path every protocol shares: a `Request` goes to the engine, and its
events come back as the protocols need them: thought text, answer text cut at stop strings,
whole tool calls parsed out of the text, logprobs, and at the end the `Reply` with its usage."""

import asyncio
import time
from typing import AsyncIterator, Awaitable, Callable, Optional

from .engine import Cancelled, Engine, Job
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


class Generation:
    """One request's run. `start()` queues it and waits for its prompt to be read (so errors in
    the prompt come before any response is sent); then either `events()` streams it or
    `collect()` gathers it. `usage` (the request's log line) is filled in as it goes.

    A client that goes away stops the run within a step: a streamed reply is cancelled by the
    server itself, a waiting one is noticed by polling `is_disconnected`."""

    def __init__(self, engine: Engine, kind: str, request: Request,
                 is_disconnected: Callable[[], Awaitable[bool]], usage: dict):
        self.engine, self.request, self.usage = engine, request, usage
        self.is_disconnected = is_disconnected
        self.job = Job(kind, request, asyncio.get_running_loop(), asyncio.Queue())
        self.streaming, self.polled = False, time.monotonic()
        self.reply = Reply()

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
        self.reply.prompt_tokens, self.reply.cached_tokens = event[1]["prompt_tokens"], event[1]["cached_tokens"]
        self.usage.update(prompt=self.reply.prompt_tokens, cached=self.reply.cached_tokens)
        return self.reply

    async def events(self) -> AsyncIterator[tuple]:
        """("reasoning", text), ("text", text), ("call", call), ("logprob", entry) until the
        reply ends; the finished `Reply` is then in `self.reply`. The run stops when this
        generator is closed."""
        r, reply = self.request, self.reply
        stops, held = StopMatcher(r.stop), ""
        try:
            while True:
                event = await self._next()
                if event[0] == "done":
                    _, reply.finish, reply.generated, reply.reasoning_tokens, reply.drafted, reply.accepted = event
                    text = held + stops.flush()
                    if text:  # an unfinished call is text after all
                        reply.text += text
                        yield ("text", text)
                    break
                _, text, thinking, reply.generated, entry = event
                if entry is not None:
                    reply.logprobs.append(entry)
                    yield ("logprob", entry)
                if thinking:
                    reply.reasoning += text
                    yield ("reasoning", text)
                    continue
                text, calls = stops.feed(text), []
                if r.tools:  # a call goes out whole, once its end marker has arrived
                    text, calls, held = take_calls(held + text)
                if text:
                    reply.text += text
                    yield ("text", text)
                for call in calls[:1] if not r.parallel_tool_calls else calls:
                    reply.calls.append(call)
                    yield ("call", call)
                if stops.stopped or (reply.calls and not r.parallel_tool_calls):
                    reply.finish, reply.stop_sequence = ("stop_sequence", stops.stopped) if stops.stopped \
                        else ("stop", None)
                    break
            if reply.calls:
                reply.finish = "tool_calls"
            self.usage["generated"] = reply.generated
        finally:
            self.job.cancelled.set()  # the reply is over or the client is gone: free the worker

    async def collect(self) -> Reply:
        async for _ in self.events():
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
