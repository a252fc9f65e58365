"""One error type for every failed request, with its gRPC code and TF Serving's HTTP status for it."""

from __future__ import annotations

import re

import grpc

CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

# TF Serving's http_server.cc ToHTTPStatusCode.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


class ServingError(Exception):
    """A request that failed with a gRPC status code and a message meant for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    @property
    def http_status(self) -> int:
        """The HTTP status TF Serving's REST API answers for this code."""
        return HTTP_STATUS.get(self.code, 500)

    def __repr__(self) -> str:
        return f"ServingError({self.code.name}, {self.message!r})"


def invalid(message: str) -> ServingError:
    """INVALID_ARGUMENT."""
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    """NOT_FOUND."""
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


_NOISE = re.compile(r"^(Graph execution error:|Detected at node |<stack traces unavailable>|\s*\[\[\{\{node )")


def clean_tf_message(message: str) -> str:
    """The useful part of a TensorFlow op error: no 'Graph execution error', node names or traces."""
    lines = [re.sub(r"\s*\[Op:[^\]]*\]$", "", line).strip() for line in str(message).splitlines()]
    lines = [line for line in lines if line and not _NOISE.match(line)]
    text = " ".join(lines[:3]) or "TensorFlow error"
    match = re.fullmatch(r"assertion failed: \[(.*)\]", text, re.DOTALL)
    return match.group(1) if match else text  # tf.debugging.Assert wraps our message in 'assertion failed: [...]'


def from_exception(error: BaseException) -> ServingError:
    """A ServingError for anything a model call raised (tf.errors.OpError keeps its code)."""
    if isinstance(error, ServingError):
        return error
    code_number = getattr(error, "error_code", None)
    if isinstance(code_number, int) and code_number in CODES_BY_NUMBER and hasattr(error, "message"):
        return ServingError(CODES_BY_NUMBER[code_number], clean_tf_message(error.message))
    return ServingError(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
