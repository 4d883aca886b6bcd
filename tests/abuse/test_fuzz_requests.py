"""Random requests on every RPC of every service: a clear answer, never a crash or a hang.

For each RPC (from the descriptors), hypothesis builds request messages of its input type with
random field values (tests/abuse/strategies.py) and sends them with a key that gets past auth
(the app's server key; the admin key on AppsService). Every answer must be OK or a status
that explains itself: never INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS, UNAVAILABLE (a crashed
or wedged process), DEADLINE_EXCEEDED (a hang: every call has a deadline), and never an error
without a message. After each RPC's examples, all three processes still answer SERVING.

Example counts come from the hypothesis profile (``ci`` by default; ``HYPOTHESIS_PROFILE=full``
for a long run).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.abuse.conftest import Stack
from tests.abuse.rpc import CALL_DEADLINE, all_methods, method_name, request_class, response_class
from tests.abuse.strategies import messages
from tests.identity.conftest import ADMIN, TestApp

UNCLEAR = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
METHODS = {method_name(m): m for m in all_methods()}

#: Defects this suite found, per RPC (xfail strict: a fix turns the case green).
KNOWN_DEFECTS: dict[str, str] = {}


class SyncStack:
    """Blocking channels to the three processes (hypothesis drives sync tests)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.channels = {
            name: grpc.insecure_channel(process.grpc_target)
            for name, process in (
                ("identity", stack.identity),
                ("delivery", stack.delivery),
                ("journey", stack.journey),
            )
        }

    def channel_of(self, method: MethodDescriptor) -> grpc.Channel:
        return self.channels[method.containing_service.full_name.split(".")[1]]

    def healthy(self, within: float = 30.0) -> list[str]:
        """Names of the processes that exited or do not answer SERVING within ``within`` s.

        Polled: the watchdog may flip a process to NOT_SERVING for a moment while the shared
        Postgres or Kafka is busy (other suites restart them); a crash or a wedge stays.
        """
        deadline = time.monotonic() + within
        while True:
            sick = []
            for name, channel in self.channels.items():
                process = getattr(self.stack, name)
                if process.process.returncode is not None:
                    sick.append(f"{name} exited with {process.process.returncode}")
                    continue
                try:
                    status = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=5
                    )
                    if status.status != health_pb2.HealthCheckResponse.SERVING:
                        sick.append(name)
                except grpc.RpcError:
                    sick.append(name)
            if not sick or time.monotonic() > deadline:
                return sick
            time.sleep(0.5)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


@pytest.fixture(scope="module")
def sync_stack(stack: Stack) -> Iterator[SyncStack]:
    sync = SyncStack(stack)
    yield sync
    sync.close()


@pytest.fixture(scope="module")
async def fuzz_app(stack: Stack) -> TestApp:
    from tests.identity.conftest import create_test_app

    return await create_test_app(stack.apps)


def call(
    sync: SyncStack, method: MethodDescriptor, requests: list[Message], metadata: Any
) -> tuple[grpc.StatusCode, str]:
    """Send ``requests`` (all of them to a client stream, else the first); status and text."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    channel = sync.channel_of(method)
    kwargs: dict[str, Any] = {
        "request_serializer": request_class(method).SerializeToString,
        "response_deserializer": response_class(method).FromString,
    }
    try:
        if method.client_streaming:
            multi = channel.stream_unary(path, **kwargs)
            multi(iter(requests), metadata=metadata, timeout=CALL_DEADLINE)
        elif method.server_streaming:
            for _ in channel.unary_stream(path, **kwargs)(
                requests[0], metadata=metadata, timeout=CALL_DEADLINE
            ):
                pass
        else:
            channel.unary_unary(path, **kwargs)(
                requests[0], metadata=metadata, timeout=CALL_DEADLINE
            )
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def _case(name: str) -> Any:
    reason = KNOWN_DEFECTS.get(name)
    marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)] if reason else []
    return pytest.param(name, id=name, marks=marks)


@pytest.mark.parametrize("name", [_case(n) for n in sorted(METHODS)])
def test_random_requests_get_a_clear_answer(
    sync_stack: SyncStack, fuzz_app: TestApp, name: str
) -> None:
    method = METHODS[name]
    admin = method.containing_service.name == "AppsService"
    metadata = ADMIN if admin else fuzz_app.server
    many = 3 if method.client_streaming else 1

    @settings(database=None)
    @given(requests=st.lists(messages(method.input_type), min_size=1, max_size=many))
    def run(requests: list[Message]) -> None:
        code, details = call(sync_stack, method, requests, metadata)
        assert code not in UNCLEAR, f"{name} answered {code.name}: {details!r} to {requests}"
        if code != grpc.StatusCode.OK:
            assert details.strip(), f"{name} answered {code.name} without a message"

    run()
    assert sync_stack.healthy() == [], f"after {name}"
