"""Errors a request gets back: one line, in the shape of the protocol the client speaks."""

import logging
from typing import Optional

from ..errors import MlxGemmaError

log = logging.getLogger("mlx_gemma.server")

# Anthropic names an error by its kind, OpenAI by a type and a code.
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                   503: "overloaded_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self, protocol: str = "openai") -> dict:
        if protocol == "anthropic":
            kind = ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
            return {"type": "error", "error": {"type": kind, "message": self.message}}
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def protocol_of(path: str) -> str:
    """Which error shape a route's clients parse."""
    return "anthropic" if path.startswith("/v1/messages") else "openai"


def one_line(text) -> str:
    return " ".join(str(text).split())


def api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, MlxGemmaError):
        return ApiError(400, one_line(e))
    log.exception("internal error")
    return ApiError(500, f"internal error ({type(e).__name__})")


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_supported(field: str, why: str, param: Optional[str] = None) -> ApiError:
    """A field that would change what is generated and that this server cannot honour (yet)."""
    return ApiError(400, f"{field}: {why}", param=param or field.split(".")[0].split("[")[0])
