"""Errors as OpenAI's API answers them: `{"error": {"message", "type", "param", "code"}}` with its status.

Every refusal the server makes is an `APIError`; the package's own `InputError`s (a bad parameter,
media file or tool message) become 400s naming what is wrong. Nothing else reaches a client: an
unexpected failure is a 500 in the same shape, logged on the server's side.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..generation_params import ContextLengthError, ParameterError


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_input_error(error: InputError) -> APIError:
    """The 400 for a correctable input; `param` where the error names one."""
    if isinstance(error, ContextLengthError):
        return bad_request(str(error), error.param, "context_length_exceeded")
    if isinstance(error, ParameterError):
        return bad_request(str(error), error.param, "invalid_value")
    return bad_request(str(error), None, "invalid_input")


def internal_error() -> APIError:
    return APIError(500, "internal server error (logged on the server)", type="server_error", code="internal_error")
