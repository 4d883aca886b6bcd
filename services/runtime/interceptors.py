"""The server interceptor every service runs: admission, auth, logging, metrics, error mapping.

grpc.aio interceptors only see the call details when the handler is looked up, not the call
itself, so :class:`ServiceInterceptor` returns a new method handler whose behaviour function
wraps the real one. All four call shapes are wrapped; for response streams the wrapper keeps the
handler's style (async generator, or coroutine writing through ``context.write``), because
grpc.aio picks how to drive a handler from the kind of function it is.

Per call, in order: a key is required unless the method is public (health, reflection); until
the service is ready a keyed call gets UNAVAILABLE; the key is authenticated and the principal
bound (:func:`~services.runtime.auth.current_principal`); the handler runs; its outcome becomes
one log line and the metrics. Errors leave in one of three ways:

- a :class:`~services.runtime.errors.DomainError` becomes its status with ``ErrorInfo`` and
  ``BadRequest`` details;
- ``context.abort`` (which raises ``grpc.aio.AbortError``) and cancellation pass through
  untouched, so the status the handler chose, or the cancellation, stands;
- anything else becomes INTERNAL with a generic message and an error id; the traceback is logged
  under that id and nothing else (no SQL, no exception text) reaches the caller. Dependency
  outages (connection refused, lost connection) and serialization conflicts are the exception:
  they become UNAVAILABLE and ABORTED, which tell a client its retry may succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import aiokafka.errors
import asyncpg
import grpc
import grpc.aio
from grpc_status import rpc_status

from services.runtime.auth import (
    Authenticator,
    MethodPolicy,
    bearer_token,
    requires_key,
    set_current_principal,
)
from services.runtime.errors import Aborted, DomainError, Unavailable, to_status_proto
from services.runtime.logging import bind_log_fields, exception_fields
from services.runtime.metrics import MethodMetrics, Metrics
from services.runtime.request_values import nul_character_error

__all__ = ["ServiceInterceptor", "infrastructure_error"]

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:  # At run time neither class is generic.
    _ServerInterceptor = grpc.aio.ServerInterceptor
    _Handler = grpc.RpcMethodHandler

_Context = grpc.aio.ServicerContext[Any, Any]
#: A handler's behaviour function. grpc-stubs types them with the sync ServicerContext; under
#: grpc.aio they take the aio one and may be coroutine or async generator functions.
_Behaviour = Callable[[Any, _Context], Any]

#: Errors that mean "a dependency is not answering right now": retrying later can succeed.
#: (Not asyncpg.InterfaceError in general: most of those are misuse, i.e. bugs.)
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncpg.PostgresConnectionError,  # includes "connection was closed in the middle"
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    aiokafka.errors.KafkaConnectionError,
)
#: PostgreSQL refusing a text or jsonb value holding U+0000: the request's fault, not a bug.
_NUL_TEXT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.CharacterNotInRepertoireError,
    asyncpg.exceptions.UntranslatableCharacterError,
)
#: Errors that mean "another transaction won a race": retrying the whole call can succeed.
_CONFLICT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
)


def infrastructure_error(exc: BaseException) -> DomainError | None:
    """The retryable error an infrastructure failure stands for, if it is one.

    Args:
        exc: An exception a handler let escape.

    Returns:
        ``Unavailable`` for an unreachable dependency, ``Aborted`` for a transaction conflict,
        None for anything else (a bug, reported as INTERNAL).
    """
    if isinstance(exc, _CONFLICT_ERRORS):
        return Aborted(
            "the request conflicted with a concurrent change; retry it",
            reason="CONCURRENT_MODIFICATION",
        )
    if isinstance(exc, _UNAVAILABLE_ERRORS):
        return Unavailable(
            "a dependency of the service is unavailable; retry with backoff",
            reason="DEPENDENCY_UNAVAILABLE",
        )
    return None


class _InternalError(DomainError):
    """What the caller learns about a bug: that it happened, and the id to report."""

    code = grpc.StatusCode.INTERNAL


def _status_code(context: _Context) -> grpc.StatusCode | None:
    """The code the handler set (``set_code`` or ``abort``), if it set one."""
    code = context.code()
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    # Some grpc versions hand back the raw integer from the C core.
    return next((item for item in grpc.StatusCode if item.value[0] == code), None)


class ServiceInterceptor(_ServerInterceptor):
    """Wraps every handler of a service with admission, auth, logging, metrics and error mapping.

    Args:
        domain: The service name, used as ``ErrorInfo.domain``.
        authenticator: Resolves bearer keys to principals.
        metrics: Where RPC metrics are recorded.
        log: Where the per-call line and unexpected errors are logged.
        policy: Decides per full method name whether a key is required.
        ready: Returns False while the service is starting; keyed calls then get UNAVAILABLE.
    """

    def __init__(
        self,
        *,
        domain: str,
        authenticator: Authenticator,
        metrics: Metrics,
        log: logging.Logger,
        policy: MethodPolicy = requires_key,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self._domain = domain
        self._authenticator = authenticator
        self._metrics = metrics
        self._log = log
        self._policy = policy
        self._ready = ready
        # grpc looks the handler up on every call; wrap each handler once, not once per call.
        # Keyed by method, holding the original so a re-registered handler is wrapped afresh;
        # unknown methods are never stored, so callers cannot grow it.
        self._wrapped: dict[str, tuple[_Handler, _Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        """Look the handler up and return a wrapped copy (None, i.e. UNIMPLEMENTED, passes)."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: _Handler, method: str) -> _Handler:
        # Resolved once per method, not per call (see MethodMetrics).
        method_metrics = self._metrics.for_method(method)

        def scope(method: str, context: _Context, request: object = None) -> _CallScope:
            return _CallScope(self, method, context, method_metrics, request)

        if not handler.request_streaming and not handler.response_streaming:
            unary_unary = cast("_Behaviour", handler.unary_unary)

            async def wrapped_unary_unary(request: Any, context: _Context) -> Any:
                async with scope(method, context, request):
                    return await _resolve(unary_unary(request, context))

            return grpc.unary_unary_rpc_method_handler(
                wrapped_unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.request_streaming and not handler.response_streaming:
            stream_unary = cast("_Behaviour", handler.stream_unary)

            async def wrapped_stream_unary(requests: Any, context: _Context) -> Any:
                async with scope(method, context):
                    return await _resolve(stream_unary(requests, context))

            return grpc.stream_unary_rpc_method_handler(
                wrapped_stream_unary, handler.request_deserializer, handler.response_serializer
            )
        behaviour = cast(
            "_Behaviour",
            handler.stream_stream if handler.request_streaming else handler.unary_stream,
        )
        factory = (
            grpc.stream_stream_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_stream_rpc_method_handler
        )
        if inspect.isasyncgenfunction(behaviour):
            generator = behaviour

            async def wrapped_generator(request: Any, context: _Context) -> AsyncIterator[Any]:
                # aclosing: if the client goes away mid-stream, the handler's generator is
                # closed too, so its finally blocks (releasing connections) run now. The
                # generator object is only created once the scope has admitted the call.
                async with (
                    scope(method, context, request),
                    contextlib.aclosing(generator(request, context)) as responses,
                ):
                    async for response in responses:
                        yield response

            return factory(
                wrapped_generator, handler.request_deserializer, handler.response_serializer
            )

        writer = behaviour

        async def wrapped_writer(request: Any, context: _Context) -> None:
            async with scope(method, context, request):
                result = await _resolve(writer(request, context))
                # A coroutine handler writes through context.write and returns None; a plain
                # function may instead return an iterable of responses.
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        await context.write(response)
                elif result is not None:
                    for response in result:
                        await context.write(response)

        return factory(wrapped_writer, handler.request_deserializer, handler.response_serializer)


async def _resolve(result: Any) -> Any:
    """Await the handler's result if it is awaitable (async handlers), else return it."""
    if inspect.isawaitable(result):
        return await result
    return result


class _CallScope:
    """One RPC from admission to its final status; an async context manager around the handler.

    Exceptions from admission (in ``__aenter__``) and from the handler (in ``__aexit__``) go
    through :meth:`_settle`, which records the outcome and either lets the exception pass or
    replaces it with an abort carrying the mapped status.
    """

    def __init__(
        self,
        interceptor: ServiceInterceptor,
        method: str,
        context: _Context,
        metrics: MethodMetrics,
        request: object = None,
    ) -> None:
        self._interceptor = interceptor
        # The request message (an iterator for client streams): only read to name a bad field.
        self._request = request
        self._method = method
        self._context = context
        self._metrics = metrics
        self._started = 0.0
        self._public = not interceptor._policy(method)

    async def __aenter__(self) -> _CallScope:
        self._started = time.perf_counter()
        self._metrics.started.inc()
        self._metrics.in_flight.inc()
        # Bound per task: each RPC runs in its own context, so nothing needs undoing.
        bind_log_fields(method=self._method, peer=self._context.peer())
        try:
            await self._admit()
        except BaseException as exc:
            await self._settle(exc)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if exc is None:
            self._finish(_status_code(self._context) or grpc.StatusCode.OK)
            return False
        await self._settle(exc)
        return False

    async def _admit(self) -> None:
        """Refuse keyed calls while starting, then authenticate the caller."""
        if self._public:
            set_current_principal(None)
            return
        interceptor = self._interceptor
        if not interceptor._ready():
            raise Unavailable("the service is starting; retry shortly", reason="SERVICE_STARTING")
        token = bearer_token(self._context.invocation_metadata())
        principal = await interceptor._authenticator.authenticate(token)
        set_current_principal(principal)
        bind_log_fields(app_id=principal.app_id, key_id=principal.key_id)

    async def _settle(self, exc: BaseException) -> None:
        """Record how the call ended; abort with the mapped status when ``exc`` needs one.

        Returns normally when ``exc`` should propagate as it is (an abort the handler chose,
        cancellation); otherwise raises the ``AbortError`` of the abort it performs.
        """
        context = self._context
        code = grpc.StatusCode.UNKNOWN
        try:
            if isinstance(exc, grpc.aio.AbortError):
                code = _status_code(context) or grpc.StatusCode.UNKNOWN
                return
            if isinstance(exc, asyncio.CancelledError | GeneratorExit) or not isinstance(
                exc, Exception
            ):
                code = grpc.StatusCode.CANCELLED
                return
            if isinstance(exc, NotImplementedError):
                code = grpc.StatusCode.UNIMPLEMENTED
                await context.abort(code, f"{self._method} is not implemented")
            error = exc if isinstance(exc, DomainError) else self._unexpected(exc)
            code = error.code
            status = rpc_status.to_status(to_status_proto(error, domain=self._interceptor._domain))
            await context.abort(status.code, status.details, status.trailing_metadata)
        finally:
            self._finish(code)

    def _unexpected(self, exc: Exception) -> DomainError:
        """Map an exception no domain code meant for the caller; log what the caller can't see."""
        log = self._interceptor._log
        if isinstance(exc, _NUL_TEXT_ERRORS):
            return nul_character_error(self._request)
        known = infrastructure_error(exc)
        if known is not None:
            log.warning("%s failed: %s", self._method, known.reason, extra=exception_fields(exc))
            return known
        error_id = secrets.token_hex(8)
        log.error(
            "%s failed with an unexpected error (error id %s)",
            self._method,
            error_id,
            exc_info=exc,
            extra={"error_id": error_id, **exception_fields(exc)},
        )
        return _InternalError(
            f"internal error; report error id {error_id} to the operator",
            reason="INTERNAL_ERROR",
            metadata={"error_id": error_id},
        )

    def _finish(self, code: grpc.StatusCode) -> None:
        interceptor = self._interceptor
        elapsed = time.perf_counter() - self._started
        self._metrics.in_flight.dec()
        self._metrics.done(code, elapsed)
        # Probes and tooling call public methods constantly: keep them out of INFO logs.
        level = logging.DEBUG if self._public else logging.INFO
        if interceptor._log.isEnabledFor(level):
            interceptor._log.log(
                level,
                "rpc %s %s",
                self._method,
                code.name,
                extra={"code": code.name, "duration_ms": round(elapsed * 1000, 2)},
            )
