"""Errors as gRPC statuses: what went wrong, where and how to fix it, with the code kubelet acts
on. Servicer methods are wrapped by `rpc`, so a refusal from the library becomes a status and a
bug becomes INTERNAL with its traceback in the server's log, never a hung call."""

from __future__ import annotations

import functools
import logging

import grpc
from stockade.runtime.errors import ContainerError, NotSupported, SpecError, StockadeError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

log = logging.getLogger("stockade.cri")


class NotFound(StockadeError):
    """An id or name that is not there (NOT_FOUND)."""


class AlreadyExists(StockadeError):
    """A name that is taken (ALREADY_EXISTS)."""


class Timeout(StockadeError):
    """A call's own time limit passed (ExecSync's timeout): DEADLINE_EXCEEDED."""


class CRIError(StockadeError):
    """A refusal with the gRPC code that says what kind it is."""

    def __init__(self, code: grpc.StatusCode, what: str, *, where: str = "", hint: str = "") -> None:
        self.code = code
        super().__init__(what, where=where, hint=hint)


def not_found(what: str, where: str = "") -> CRIError:
    return CRIError(grpc.StatusCode.NOT_FOUND, what, where=where)


def invalid(what: str, where: str, hint: str = "") -> CRIError:
    return CRIError(grpc.StatusCode.INVALID_ARGUMENT, what, where=where, hint=hint)


def code_of(exc: StockadeError) -> grpc.StatusCode:
    from stockade.runtime.images.registry import DeadlineExceeded, RegistryError

    if isinstance(exc, CRIError):
        return exc.code
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, AlreadyExists):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(exc, Timeout):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, RegistryError):
        return {404: grpc.StatusCode.NOT_FOUND, 401: grpc.StatusCode.UNAUTHENTICATED,
                403: grpc.StatusCode.PERMISSION_DENIED}.get(exc.status, grpc.StatusCode.UNAVAILABLE)
    from .ipam import Exhausted

    if isinstance(exc, Exhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, (ContainerError, NotSupported)):  # the state, or what this host can enforce
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, SpecError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.UNKNOWN


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: object, request: object, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except StockadeError as exc:
            log.info("%s refused: %s", method.__name__, exc)
            context.abort(code_of(exc), str(exc))
        except Exception:  # a bug: say so, keep serving everyone else
            log.exception("%s failed", method.__name__)
            message = f"{method.__name__}: internal error (see the server's log)"
            context.abort(grpc.StatusCode.INTERNAL, message)

    return call
