"""The server interceptor, through a real grpc.aio server and channel on a free local port.

A generic ``test.v1.Echo`` service with ``StringValue`` messages covers the four call shapes;
the request text selects what the handler does (fail with a domain error, crash, abort...).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import asyncpg
import grpc
import grpc.aio
import pytest
from google.protobuf.wrappers_pb2 import StringValue
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from services.runtime.auth import (
    AdminKeyAuthenticator,
    Principal,
    Scope,
    current_principal,
    require_scope,
)
from services.runtime.errors import FieldViolations, NotFound, Unauthenticated
from services.runtime.grpc_server import Health, bind, create_server, enable_reflection
from services.runtime.interceptors import ServiceInterceptor
from services.runtime.metrics import Metrics

ADMIN_KEY = "admin-secret"
SERVER_KEY = "server-key-of-app-1"
SERVICE = "test.v1.Echo"
LOGGER = "tidings.test-interceptors"

_Context = grpc.aio.ServicerContext[Any, Any]


class _Keys:
    """The admin key, plus one app server key: what identity's authenticator will look like."""

    def __init__(self) -> None:
        self._admin = AdminKeyAuthenticator(ADMIN_KEY)

    async def authenticate(self, token: str) -> Principal:
        if token == SERVER_KEY:
            return Principal(app_id="app-1", key_id="key-1", scope=Scope.SERVER)
        return await self._admin.authenticate(token)


@dataclass
class _Observed:
    """What the handlers saw, for assertions that need the server side."""

    calls: int = 0
    stream_closed: asyncio.Event = field(default_factory=asyncio.Event)


def _fail_as(text: str) -> None:
    """Raise what the request text asks for; do nothing for ordinary text."""
    if text == "invalid":
        violations = FieldViolations()
        violations.add("value", "must not be 'invalid'")
        violations.add("other", "is required", reason="REQUIRED")
        violations.raise_if_any()
    if text == "missing":
        raise NotFound("no such thing", reason="THING_NOT_FOUND", metadata={"thing": "x"})
    if text == "crash":
        raise RuntimeError("SELECT password FROM users WHERE id = 42 -- leaked?")
    if text == "db down":
        raise ConnectionRefusedError("connect to 10.0.0.7:5432 refused")
    if text == "conflict":
        raise asyncpg.exceptions.SerializationError("could not serialize access")
    if text == "unimplemented":
        raise NotImplementedError("not yet")


def _handlers(observed: _Observed) -> grpc.GenericRpcHandler[Any, Any]:
    async def echo(request: StringValue, context: _Context) -> StringValue:
        observed.calls += 1
        if request.value == "abort":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "handler chose this")
        if request.value == "set code":
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details("set, not raised")
            return StringValue()
        _fail_as(request.value)
        return StringValue(value=request.value)

    async def whoami(request: StringValue, context: _Context) -> StringValue:
        principal = current_principal()
        return StringValue(value=f"{principal.scope.value}:{principal.key_id}:{principal.app_id}")

    async def admin_only(request: StringValue, context: _Context) -> StringValue:
        require_scope(Scope.ADMIN)
        return StringValue(value="ok")

    async def count(request: StringValue, context: _Context) -> AsyncIterator[StringValue]:
        # Async-generator style: "3" yields 0, 1, 2; "3 then missing" fails after them.
        observed.calls += 1
        how_many, _, then = request.value.partition(" then ")
        try:
            for index in range(int(how_many)):
                yield StringValue(value=str(index))
            _fail_as(then)
            if then == "forever":
                await asyncio.Event().wait()
        finally:
            observed.stream_closed.set()

    async def count_by_writing(request: StringValue, context: _Context) -> None:
        # Coroutine style: responses go through context.write.
        how_many, _, then = request.value.partition(" then ")
        for index in range(int(how_many)):
            await context.write(StringValue(value=str(index)))
        _fail_as(then)

    async def join(requests: AsyncIterator[StringValue], context: _Context) -> StringValue:
        observed.calls += 1
        parts = [request.value async for request in requests]
        for part in parts:
            _fail_as(part)
        return StringValue(value=",".join(parts))

    async def shout(
        requests: AsyncIterator[StringValue], context: _Context
    ) -> AsyncIterator[StringValue]:
        observed.calls += 1
        async for request in requests:
            _fail_as(request.value)
            yield StringValue(value=request.value.upper())

    messages: dict[str, Any] = {
        "request_deserializer": StringValue.FromString,
        "response_serializer": StringValue.SerializeToString,
    }
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo, **messages),
            "WhoAmI": grpc.unary_unary_rpc_method_handler(whoami, **messages),
            "AdminOnly": grpc.unary_unary_rpc_method_handler(admin_only, **messages),
            "Count": grpc.unary_stream_rpc_method_handler(count, **messages),
            "CountByWriting": grpc.unary_stream_rpc_method_handler(count_by_writing, **messages),
            "Join": grpc.stream_unary_rpc_method_handler(join, **messages),
            "Shout": grpc.stream_stream_rpc_method_handler(shout, **messages),
        },
    )


@dataclass
class _Harness:
    channel: grpc.aio.Channel
    metrics: Metrics
    observed: _Observed
    ready: list[bool]

    def unary_unary(self, name: str) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        return self.channel.unary_unary(
            f"/{SERVICE}/{name}",
            request_serializer=StringValue.SerializeToString,
            response_deserializer=StringValue.FromString,
        )

    def unary_stream(self, name: str) -> grpc.aio.UnaryStreamMultiCallable[Any, Any]:
        return self.channel.unary_stream(
            f"/{SERVICE}/{name}",
            request_serializer=StringValue.SerializeToString,
            response_deserializer=StringValue.FromString,
        )

    def stream_unary(self, name: str) -> grpc.aio.StreamUnaryMultiCallable[Any, Any]:
        return self.channel.stream_unary(
            f"/{SERVICE}/{name}",
            request_serializer=StringValue.SerializeToString,
            response_deserializer=StringValue.FromString,
        )

    def stream_stream(self, name: str) -> Any:  # the stubs' type lacks calls with no iterator
        return self.channel.stream_stream(
            f"/{SERVICE}/{name}",
            request_serializer=StringValue.SerializeToString,
            response_deserializer=StringValue.FromString,
        )

    def handled(self, method: str, code: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "grpc_server_handled_total",
            {"grpc_service": SERVICE, "grpc_method": method, "grpc_code": code},
        )
        return value or 0.0


@pytest.fixture(scope="module")
async def harness() -> AsyncIterator[_Harness]:
    metrics = Metrics()
    observed = _Observed()
    ready = [True]
    interceptor = ServiceInterceptor(
        domain="testing",
        authenticator=_Keys(),
        metrics=metrics,
        log=logging.getLogger(LOGGER),
        ready=lambda: ready[0],
    )
    server = create_server([interceptor])
    server.add_generic_rpc_handlers((_handlers(observed),))
    health = await Health.register(server, [SERVICE])
    await health.set_serving(True)
    enable_reflection(server, [SERVICE])
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield _Harness(channel, metrics, observed, ready)
    finally:
        await channel.close(grace=None)
        await server.stop(grace=None)


def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


ADMIN = _bearer(ADMIN_KEY)


def _rich(error: grpc.aio.AioRpcError) -> tuple[Any, error_details_pb2.ErrorInfo, Any]:
    """The status, its ErrorInfo and its BadRequest, as a client decodes them."""
    status = rpc_status.from_call(cast(Any, error))
    assert status is not None, "no google.rpc.Status in the trailers"
    info = error_details_pb2.ErrorInfo()
    bad_request = error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(bad_request.DESCRIPTOR):
            detail.Unpack(bad_request)
    return status, info, bad_request


async def _eventually(check: Callable[[], bool], what: str, within: float = 5.0) -> None:
    """Poll ``check`` until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------- authentication


async def test_missing_key_is_unauthenticated_and_handler_not_called(harness: _Harness) -> None:
    before = harness.observed.calls
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await harness.unary_unary("Echo")(StringValue(value="hi"))
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <key>" in (raised.value.details() or "")
    _, info, _ = _rich(raised.value)
    assert info.reason == "API_KEY_MISSING"
    assert info.domain == "testing"
    assert harness.observed.calls == before


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Basic dXNlcjpwYXNz", "API_KEY_MALFORMED"),
        ("Bearer", "API_KEY_MALFORMED"),
        ("Bearer a b", "API_KEY_MALFORMED"),
        ("Bearer not-a-key", "API_KEY_INVALID"),
        (f"bearer  {ADMIN_KEY}x", "API_KEY_INVALID"),
    ],
)
async def test_bad_keys_are_unauthenticated(harness: _Harness, header: str, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await harness.unary_unary("Echo")(
            StringValue(value="hi"), metadata=(("authorization", header),)
        )
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert _rich(raised.value)[1].reason == reason


async def test_admin_key_is_accepted_and_principal_is_bound(harness: _Harness) -> None:
    assert (await harness.unary_unary("Echo")(StringValue(value="hi"), metadata=ADMIN)).value == (
        "hi"
    )
    whoami = harness.unary_unary("WhoAmI")
    assert (await whoami(StringValue(), metadata=ADMIN)).value == "admin:admin:None"
    server_key = _bearer(SERVER_KEY)
    assert (await whoami(StringValue(), metadata=server_key)).value == "server:key-1:app-1"


async def test_scope_check_is_permission_denied(harness: _Harness) -> None:
    admin_only = harness.unary_unary("AdminOnly")
    assert (await admin_only(StringValue(), metadata=ADMIN)).value == "ok"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await admin_only(StringValue(), metadata=_bearer(SERVER_KEY))
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert _rich(raised.value)[1].reason == "KEY_SCOPE_INSUFFICIENT"


async def test_health_and_reflection_need_no_key(harness: _Harness) -> None:
    health = health_pb2_grpc.HealthStub(harness.channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    # The stock Check aborts NOT_FOUND for unknown names: an abort must pass through unchanged.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND

    reflection = reflection_pb2_grpc.ServerReflectionStub(harness.channel)
    call = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {
        service.name async for answer in call for service in answer.list_services_response.service
    }
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


async def test_keyed_calls_are_unavailable_until_ready(harness: _Harness) -> None:
    harness.ready[0] = False
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await harness.unary_unary("Echo")(StringValue(value="hi"), metadata=ADMIN)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        assert _rich(raised.value)[1].reason == "SERVICE_STARTING"
        # Probes still answer while starting.
        health = health_pb2_grpc.HealthStub(harness.channel)
        await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
    finally:
        harness.ready[0] = True


# ---------------------------------------------------------------------------- error mapping


async def test_domain_error_becomes_rich_status(harness: _Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await harness.unary_unary("Echo")(StringValue(value="invalid"), metadata=ADMIN)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    status, info, bad_request = _rich(raised.value)
    assert status.message == "invalid request: value, other"
    assert (info.reason, info.domain) == ("INVALID_FIELDS", "testing")
    assert [(v.field, v.description, v.reason) for v in bad_request.field_violations] == [
        ("value", "must not be 'invalid'", ""),
        ("other", "is required", "REQUIRED"),
    ]

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await harness.unary_unary("Echo")(StringValue(value="missing"), metadata=ADMIN)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    _, info, _ = _rich(raised.value)
    assert (info.reason, dict(info.metadata)) == ("THING_NOT_FOUND", {"thing": "x"})


async def test_unexpected_error_is_internal_and_leaks_nothing(
    harness: _Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger=LOGGER),
        pytest.raises(grpc.aio.AioRpcError) as raised,
    ):
        await harness.unary_unary("Echo")(StringValue(value="crash"), metadata=ADMIN)
    error = raised.value
    assert error.code() is grpc.StatusCode.INTERNAL
    everything_sent = f"{error.details()} {error.trailing_metadata()} {error.debug_error_string()}"
    for secret in ("SELECT", "password", "RuntimeError", "Traceback", "test_interceptors"):
        assert secret not in everything_sent
    _, info, _ = _rich(error)
    error_id = info.metadata["error_id"]
    assert info.reason == "INTERNAL_ERROR"
    assert error_id in (error.details() or "")

    # The operator finds the traceback in the log under the same id.
    logged = [record for record in caplog.records if getattr(record, "error_id", None) == error_id]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert "SELECT password" in str(logged[0].exc_info[1])


@pytest.mark.parametrize(
    ("text", "code", "reason"),
    [
        ("db down", grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE"),
        ("conflict", grpc.StatusCode.ABORTED, "CONCURRENT_MODIFICATION"),
    ],
)
async def test_infrastructure_errors_are_retryable_codes(
    harness: _Harness, text: str, code: grpc.StatusCode, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await harness.unary_unary("Echo")(StringValue(value=text), metadata=ADMIN)
    assert raised.value.code() is code
    assert _rich(raised.value)[1].reason == reason
    assert "10.0.0.7" not in (raised.value.details() or "")


async def test_handler_abort_and_set_code_pass_through(harness: _Harness) -> None:
    echo = harness.unary_unary("Echo")
    before = harness.handled("Echo", "FAILED_PRECONDITION")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await echo(StringValue(value="abort"), metadata=ADMIN)
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert raised.value.details() == "handler chose this"
    assert harness.handled("Echo", "FAILED_PRECONDITION") == before + 1

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await echo(StringValue(value="set code"), metadata=ADMIN)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    assert raised.value.details() == "set, not raised"


async def test_not_implemented_is_unimplemented(harness: _Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await harness.unary_unary("Echo")(StringValue(value="unimplemented"), metadata=ADMIN)
    assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
    # And a method nobody registered stays UNIMPLEMENTED too.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await harness.unary_unary("Nope")(StringValue(), metadata=ADMIN)
    assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED


# ---------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("method", ["Count", "CountByWriting"])
async def test_server_streaming(harness: _Harness, method: str) -> None:
    call = harness.unary_stream(method)
    assert [r.value async for r in call(StringValue(value="3"), metadata=ADMIN)] == ["0", "1", "2"]

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [r async for r in call(StringValue(value="3"))]
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED

    # Items already sent arrive; then the rich error ends the stream.
    received: list[str] = []

    async def read_all() -> None:
        async for response in call(StringValue(value="2 then invalid"), metadata=ADMIN):
            received.append(response.value)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await read_all()
    assert received == ["0", "1"]
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert _rich(raised.value)[2].field_violations[0].field == "value"

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [r async for r in call(StringValue(value="1 then crash"), metadata=ADMIN)]
    assert raised.value.code() is grpc.StatusCode.INTERNAL
    assert "SELECT" not in (raised.value.details() or "")


async def test_client_streaming(harness: _Harness) -> None:
    join = harness.stream_unary("Join")

    async def requests(*values: str) -> AsyncIterator[StringValue]:
        for value in values:
            yield StringValue(value=value)

    assert (await join(requests("a", "b", "c"), metadata=ADMIN)).value == "a,b,c"

    before = harness.observed.calls
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await join(requests("a"))
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert harness.observed.calls == before

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await join(requests("a", "missing"), metadata=ADMIN)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    assert _rich(raised.value)[1].reason == "THING_NOT_FOUND"


async def test_bidirectional_streaming(harness: _Harness) -> None:
    shout = harness.stream_stream("Shout")
    call = shout(metadata=ADMIN)
    await call.write(StringValue(value="hello"))
    assert (await call.read()).value == "HELLO"
    await call.write(StringValue(value="again"))
    assert (await call.read()).value == "AGAIN"
    await call.write(StringValue(value="crash"))
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() is grpc.StatusCode.INTERNAL

    call = shout(metadata=(("authorization", "Bearer nope"),))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_client_cancelling_a_stream_closes_the_handler(harness: _Harness) -> None:
    harness.observed.stream_closed.clear()
    before = harness.handled("Count", "CANCELLED")
    call = harness.unary_stream("Count")(StringValue(value="1 then forever"), metadata=ADMIN)
    first = await call.read()
    assert isinstance(first, StringValue)
    assert first.value == "0"
    call.cancel()
    # The handler's finally ran (its generator was closed) and the call counts as cancelled.
    await asyncio.wait_for(harness.observed.stream_closed.wait(), timeout=5)
    await _eventually(lambda: harness.handled("Count", "CANCELLED") == before + 1, "metrics")


# ---------------------------------------------------------------------------- observability


async def test_metrics_and_log_line_per_call(
    harness: _Harness, caplog: pytest.LogCaptureFixture
) -> None:
    ok_before = harness.handled("Echo", "OK")
    unauthenticated_before = harness.handled("Echo", "UNAUTHENTICATED")
    echo = harness.unary_unary("Echo")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        await echo(StringValue(value="hi"), metadata=_bearer(SERVER_KEY))
        with pytest.raises(grpc.aio.AioRpcError):
            await echo(StringValue(value="hi"))
    assert harness.handled("Echo", "OK") == ok_before + 1
    assert harness.handled("Echo", "UNAUTHENTICATED") == unauthenticated_before + 1
    latency_count = harness.metrics.registry.get_sample_value(
        "grpc_server_handling_seconds_count", {"grpc_service": SERVICE, "grpc_method": "Echo"}
    )
    assert latency_count is not None
    assert latency_count >= 2
    in_flight = harness.metrics.registry.get_sample_value(
        "grpc_server_in_flight", {"grpc_service": SERVICE}
    )
    assert in_flight == 0

    lines = [r for r in caplog.records if r.name == LOGGER and r.getMessage().startswith("rpc ")]
    assert [(r.getMessage(), r.__dict__["code"]) for r in lines[-2:]] == [
        (f"rpc /{SERVICE}/Echo OK", "OK"),
        (f"rpc /{SERVICE}/Echo UNAUTHENTICATED", "UNAUTHENTICATED"),
    ]
    assert all(isinstance(r.__dict__["duration_ms"], float) for r in lines[-2:])


async def test_authenticator_failures_are_mapped_too(harness: _Harness) -> None:
    """An authenticator that fails unexpectedly (identity down) must not leak either."""

    class Broken:
        async def authenticate(self, token: str) -> Principal:
            raise OSError("identity at 10.1.2.3:50051 unreachable")

    class Refusing:
        async def authenticate(self, token: str) -> Principal:
            raise Unauthenticated("the API key was revoked", reason="API_KEY_REVOKED")

    for authenticator, code in (
        (Broken(), grpc.StatusCode.INTERNAL),
        (Refusing(), grpc.StatusCode.UNAUTHENTICATED),
    ):
        interceptor = ServiceInterceptor(
            domain="testing",
            authenticator=authenticator,
            metrics=Metrics(),
            log=logging.getLogger(LOGGER),
        )
        server = create_server([interceptor])
        server.add_generic_rpc_handlers((_handlers(_Observed()),))
        port = bind(server, "127.0.0.1", 0)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                echo: Callable[..., Awaitable[Any]] = channel.unary_unary(
                    f"/{SERVICE}/Echo",
                    request_serializer=StringValue.SerializeToString,
                    response_deserializer=StringValue.FromString,
                )
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await echo(StringValue(value="hi"), metadata=ADMIN)
                assert raised.value.code() is code
                assert "10.1.2.3" not in (raised.value.details() or "")
        finally:
            await server.stop(grace=None)
