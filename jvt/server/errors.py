"""API errors: one exception type carrying an HTTP status, and the OpenAI error body."""

from __future__ import annotations

import re

from jvt.server.protocol import ErrorInfo, ErrorResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error",
          404: "invalid_request_error"}
_SAMPLING_FIELD = re.compile(r"SamplingParams\.(\w+)")


class APIError(Exception):
    """An error answered with ``status`` and the OpenAI error body (``api_server`` handles it).

    headers: extra response headers (``Retry-After`` on 503).
    """

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers

    def body(self) -> ErrorResponse:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=_TYPES.get(status, "server_error"),
                                         param=param, code=status))


def sampling_field(message: str) -> str | None:
    """The SamplingParams field an error message of the engine names, if any."""
    m = _SAMPLING_FIELD.search(message)
    return m and m.group(1)


def bad_sampling_params(e: ValueError, renames: dict[str, str] | None = None) -> APIError:
    """400 for a ValueError of jvt.SamplingParams; param is the field its message names,
    through ``renames`` where the request calls it otherwise (chat's top_logprobs)."""
    param = sampling_field(str(e))
    return APIError(400, str(e), (renames or {}).get(param, param))
