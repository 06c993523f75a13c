"""The HTTP layer: FastAPI routes for the three protocols, the API key, errors in each
protocol's shape, SSE framing, /health. No generation here: a route parses its protocol's body,
translates it into a `Request`, runs it through `reply.run`, and renders the `Reply`."""

import asyncio
import hmac
import json
import re
import time
from typing import Optional

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .engine import Engine
from .job import Cancelled
from .errors import ApiError, api_error, log, one_line, protocol_of
from .media import MediaPolicy
from .protocol import chat, messages, responses
from .protocol.base import parse
from .reply import run
from .request import Request
from .store import ResponseStore


LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ANY_ADDRESS = {"0.0.0.0", "::", ""}


def host_of(value: str) -> str:
    """The host part of a Host header (`[::1]:8080` -> `::1`)."""
    if value.startswith("["):
        return value[1:value.find("]")]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """The ASGI layer around the routes: who may call (the Host a browser was pointed at, the web
    page's Origin, a JSON body, the API key by `Authorization: Bearer` or `x-api-key`), errors
    in the client's protocol's shape for anything that escapes, and one log line per request
    when its response has been sent (a stream at its end).

    A web page the user visits can send requests to 127.0.0.1 (a form's text/plain POST needs no
    preflight), or reach it by a DNS name rebound to 127.0.0.1: the Host and Origin checks and
    the JSON content type close both ways in."""

    def __init__(self, app, api_key: Optional[str], host: str, origins: list, metrics=None):
        self.app, self.api_key, self.origins, self.metrics = app, api_key, set(origins or []), metrics
        self.hosts = None if host in ANY_ADDRESS else LOOPBACK | {host_of(host)}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tic, status, usage = time.perf_counter(), [0], {}
        scope.setdefault("state", {})["usage"] = usage

        async def tracked(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def reply(e: ApiError):
            await JSONResponse(e.body(protocol_of(scope["path"])), status_code=e.status,
                               headers=e.headers)(scope, receive, tracked)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await reply(refusal)
            else:
                await self.app(scope, receive, tracked)
        except Exception as e:
            if not status[0]:
                await reply(api_error(e))
            elif not isinstance(e, OSError):
                log.exception("error after the response started")
        finally:
            if self.metrics is not None:
                self.metrics.requests.labels(endpoint=ENDPOINTS.get(scope["path"], "other"), status=str(status[0])).inc()
            log.info("%s %s %d prompt=%s cached=%s generated=%s %.3fs", scope["method"], scope["path"], status[0],
                     usage.get("prompt", "-"), usage.get("cached", "-"), usage.get("generated", "-"),
                     time.perf_counter() - tic)

    def _refusal(self, scope) -> Optional[ApiError]:
        headers = dict(scope["headers"])
        host = host_of(headers.get(b"host", b"").decode("latin-1"))
        if self.hosts is not None and host not in self.hosts:
            return ApiError(403, f"Host {host[:100]!r} is not this server's address (start it with --host to "
                                 "serve another)", type="permission_error", code="host_not_allowed")
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and origin not in self.origins and "*" not in self.origins:
            return ApiError(403, f"requests from web pages at {origin[:100]!r} are refused (start the server with "
                                 "--cors-allow-origin to allow them)", type="permission_error",
                            code="origin_not_allowed")
        kind = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if scope["method"] == "POST" and kind != "application/json":
            return ApiError(415, f"Content-Type must be application/json, got {kind[:100] or 'none'!r}",
                            code="unsupported_media_type")
        if self.api_key and scope["path"].startswith("/v1/") and not self._authorized(headers):
            return ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
                            type="authentication_error", code="invalid_api_key")
        return None

    def _authorized(self, headers: dict) -> bool:
        key = self.api_key.encode()
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return (hmac.compare_digest(headers.get(b"x-api-key", b""), key)
                or (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)))


def streamed(generation, events, error) -> StreamingResponse:
    """An SSE response; an error after it started goes out as the protocol's error event."""
    async def body():
        try:
            async for chunk in events:
                yield chunk
        except Cancelled:
            pass
        except Exception as e:
            yield error(api_error(e))
        finally:
            generation.job.cancelled.set()  # the client is gone or the reply is over: free the worker

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


GONE = JSONResponse({}, status_code=499)  # the client hung up while its request waited
ENDPOINTS = {p: p for p in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
                            "/v1/messages/count_tokens", "/v1/models", "/health", "/metrics")}  # metric labels
MEDIA_DECODERS = 2  # requests whose media are decoded at once


def create_app(engine: Engine, args, served: str, metrics=None) -> FastAPI:
    app = FastAPI(title="mlx-gemma", docs_url=None, redoc_url=None, openapi_url=None)
    policy = MediaPolicy(args.allow_local_media, args.allow_remote_media, args.allow_long_media, args.max_body_bytes,
                         args.max_image_pixels)
    store = ResponseStore(args.responses_store_count, args.responses_store_bytes)
    if args.cors_allow_origin:  # answers an allowed page's preflight before the Guard sees it
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=args.cors_allow_origin, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(Guard, api_key=args.api_key, host=args.host, origins=args.cors_allow_origin, metrics=metrics)

    async def read_json(request: HttpRequest) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > args.max_body_bytes:
            raise ApiError(413, f"the request body is {declared} bytes, over the limit of {args.max_body_bytes}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > args.max_body_bytes:
                raise ApiError(413, f"the request body is over the limit of {args.max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
            if re.search(rb"\\u[dD][89a-fA-F]", raw):  # escapes of UTF-16 halves: paired ones make text
                json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a ValueError too: first
            raise ApiError(400, "the body holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape): "
                                "not text") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, too deep, too many digits
            raise ApiError(400, f"the body is not valid JSON ({one_line(e)[:200]})") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
        return body

    decoding = asyncio.Semaphore(MEDIA_DECODERS)

    async def translated(translate, *args) -> Request:
        """Media are decoded off the event loop, a few requests at a time (each may hold a
        decoded image of --max-image-pixels)."""
        async with decoding:
            return await run_in_threadpool(translate, *args)

    async def answer(request: HttpRequest, kind: str, internal: Request, stream: bool, out, whole):
        """Run a request, answered in `out`'s protocol: its event stream, or `whole(generation)`."""
        generation = await run(engine, kind, internal, request, stream)
        if generation is None:
            return GONE
        if stream:
            return streamed(generation, out.stream(generation), out.error)
        try:
            await generation.collect()
        except Cancelled:
            return GONE
        return whole(generation)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = parse(chat.ChatRequest, await read_json(request))
        out = chat.Chat(served, chat=True, logprobs=bool(body.logprobs),
                        include_usage=bool(body.stream_options and body.stream_options.include_usage))
        return await answer(request, "chat", await translated(chat.chat_request, body, policy), body.stream, out,
                            lambda generation: out.response(generation.replies))

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = parse(chat.CompletionRequest, await read_json(request))
        out = chat.Chat(served, chat=False)
        return await answer(request, "completion", chat.completion_request(body), body.stream, out,
                            lambda generation: out.response(generation.replies))

    @app.post("/v1/messages")
    async def create_message(request: HttpRequest):
        body = parse(messages.MessagesRequest, await read_json(request))
        out = messages.Messages(served, body)
        return await answer(request, "chat", await translated(messages.messages_request, body, policy), body.stream,
                            out, lambda generation: out.response(generation.reply))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: HttpRequest):
        body = parse(messages.Conversation, await read_json(request))
        generation = await run(engine, "count", await translated(messages.conversation_request, body, policy),
                               request, False)
        return GONE if generation is None else {"input_tokens": generation.reply.prompt_tokens}

    def stored(rid: str):
        entry = store.get(rid)
        if entry is None:
            raise ApiError(404, f"no stored response has the id {rid[:100]!r}", param="response_id", code="not_found")
        return entry

    @app.post("/v1/responses")
    async def create_response(request: HttpRequest):
        body = parse(responses.ResponsesRequest, await read_json(request))
        history = []
        if body.previous_response_id is not None:
            entry = store.get(body.previous_response_id)
            if entry is None:
                raise ApiError(400, f"previous_response_id: no stored response has the id "
                                    f"{body.previous_response_id[:100]!r}", param="previous_response_id",
                               code="previous_response_not_found")
            history = entry.items
        internal, items = await translated(responses.responses_request, body, history, policy)
        generation = await run(engine, "chat", internal, request, body.stream)
        if generation is None:
            return GONE
        out = responses.Responses(served, body)

        def keep(response: dict, output: list) -> None:
            if body.store is not False:
                store.put(response["id"], response, items + output, len(items))

        if body.stream:
            return streamed(generation, out.stream(generation, keep), out.error)
        try:
            reply = await generation.collect()
        except Cancelled:
            return GONE
        output = responses.output_items(reply)
        response = out.response(reply, output)
        keep(response, output)
        return response

    @app.get("/v1/responses/{rid}")
    async def get_response(rid: str):
        return stored(rid).response

    @app.delete("/v1/responses/{rid}")
    async def delete_response(rid: str):
        stored(rid)
        store.delete(rid)
        return {"id": rid, "object": "response.deleted", "deleted": True}

    @app.get("/v1/responses/{rid}/input_items")
    async def input_items(rid: str, limit: int = 20, order: str = "desc", after: Optional[str] = None):
        if order not in ("asc", "desc") or not 1 <= limit <= 100:
            raise ApiError(400, "order must be asc or desc, and limit from 1 to 100", param="order")
        entry = stored(rid)
        items = [dict(item, id=item.get("id") or f"item_{k}") for k, item in enumerate(entry.items[:entry.inputs])]
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [i["id"] for i in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    def model_card(name: str) -> dict:
        """OpenAI's fields and Anthropic's, so both SDKs read it."""
        return {"id": name, "object": "model", "created": 0, "owned_by": "mlx-gemma", "type": "model",
                "display_name": name, "created_at": "1970-01-01T00:00:00Z"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(served)], "has_more": False, "first_id": served,
                "last_id": served}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        return model_card(name)  # any name is served (by this one model)

    @app.get("/health")
    async def health():
        if not engine.thread.is_alive():  # a supervisor restarts a server that says so
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok", "busy": bool(engine.running), "waiting": engine.waiting, "running": len(engine.running)}

    @app.get("/metrics")
    async def prometheus():
        from fastapi.responses import Response

        return Response(metrics.text() if metrics is not None else b"", media_type="text/plain; version=0.0.4")

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    def error_response(request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(protocol_of(request.url.path)), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request, e: ApiError):
        return error_response(request, e)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(request, ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                                code=code))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e):
        return error_response(request, ApiError(400, one_line(e)[:300]))

    return app
