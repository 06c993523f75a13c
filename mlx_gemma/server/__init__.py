"""The HTTP server: OpenAI Chat Completions / Completions / Responses and Anthropic Messages on
one engine. One job per module:

    protocol/  each wire format's pydantic models, translated to and from one internal request
    request    that internal `Request` and the `Reply` it gets
    reply      the one generation path every protocol shares (stops, tool calls, thoughts)
    engine     the worker thread that owns the model: continuous batching, admission, prefix cache
    job        a request as the engine runs it (events, cancellation);  sequence  one running reply
    plan       what the memory plan gives the server (context, prefix cache, the batch's room)
    app        FastAPI routes, the API key, errors in each protocol's shape, SSE
    media      what a request may read as media;  tools  Gemma's tool-call text
    store      stored Responses for previous_response_id;  main  flags and startup
"""

from .main import build_parser, main
from .plan import plan_server

__all__ = ["build_parser", "main", "plan_server"]
