"""Every RPC of Tidings, from the generated descriptors, and one way to call any of them.

:func:`all_services` imports every generated ``*_pb2`` module under ``gen/tidings`` and returns
each service it declares, so a new service or RPC is in every test built on it without anyone
listing it. :func:`invoke` calls a method of any shape (unary or streaming either way) and
returns how it ended, with the responses and the error's text.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

Metadata = tuple[tuple[str, str], ...]

#: Seconds any call of the suite may take: a hang is a failure, not a stuck run.
CALL_DEADLINE = 15.0


def all_services() -> tuple[ServiceDescriptor, ...]:
    """Every service declared in the generated code of ``protos/tidings``, by full name."""
    import tidings

    found: dict[str, ServiceDescriptor] = {}
    for info in pkgutil.walk_packages(tidings.__path__, "tidings."):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(info.name)
        for service in module.DESCRIPTOR.services_by_name.values():
            found[service.full_name] = service
    return tuple(found[name] for name in sorted(found))


def all_methods() -> tuple[MethodDescriptor, ...]:
    """Every RPC of every service."""
    return tuple(m for s in all_services() for m in s.methods)


def method_name(method: MethodDescriptor) -> str:
    """``Service.Method``."""
    return f"{method.containing_service.name}.{method.name}"


def request_class(method: MethodDescriptor) -> Any:
    return message_factory.GetMessageClass(method.input_type)


def response_class(method: MethodDescriptor) -> Any:
    return message_factory.GetMessageClass(method.output_type)


@dataclass
class Outcome:
    """How one call ended: status, the error's message and reason, and what came back."""

    code: grpc.StatusCode
    message: str = ""
    reason: str = ""
    responses: list[Message] = field(default_factory=list)

    def __str__(self) -> str:
        reason = f"({self.reason})" if self.reason else ""
        return f"{self.code.name}{reason} {self.message[:160]!r}"

    def text(self) -> str:
        """Everything the caller saw, as text (for grepping for canaries)."""
        parts = [self.message, self.reason]
        for response in self.responses:
            parts.append(str(response))
            parts.append(response.SerializeToString().decode("utf-8", "replace"))
        return "\n".join(parts)


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def _details_text(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    return str(status) if status is not None else ""


async def invoke(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    requests: Message | Sequence[Message],
    metadata: Metadata,
    timeout: float = CALL_DEADLINE,  # noqa: ASYNC109 (a gRPC deadline, sent to the server)
) -> Outcome:
    """Call ``method``; a client-streaming method sends every request of a sequence.

    A deadline exceeded is returned as DEADLINE_EXCEEDED like any other status, so callers can
    treat a hang as the failure it is.
    """
    path = f"/{method.containing_service.full_name}/{method.name}"
    serializers: dict[str, Any] = {
        "request_serializer": request_class(method).SerializeToString,
        "response_deserializer": response_class(method).FromString,
    }
    many = list(requests) if isinstance(requests, Sequence) else [requests]

    def stream() -> Iterator[Message]:
        yield from many

    responses: list[Message] = []
    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(path, **serializers)(
                stream(), metadata=metadata, timeout=timeout
            )
            responses.extend([r async for r in call])
        elif method.client_streaming:
            responses.append(
                await channel.stream_unary(path, **serializers)(
                    stream(), metadata=metadata, timeout=timeout
                )
            )
        elif method.server_streaming:
            server_stream = channel.unary_stream(path, **serializers)(
                many[0], metadata=metadata, timeout=timeout
            )
            responses.extend([r async for r in server_stream])
        else:
            responses.append(
                await channel.unary_unary(path, **serializers)(
                    many[0], metadata=metadata, timeout=timeout
                )
            )
    except grpc.aio.AioRpcError as error:
        return Outcome(
            error.code(),
            f"{error.details() or ''}\n{_details_text(error)}",
            _reason(error),
            responses,
        )
    return Outcome(grpc.StatusCode.OK, "", "", responses)


class _Messages:
    """Any Tidings message class by its short name (``M.CreateSegmentRequest``), wherever the
    generated code declares it."""

    def __init__(self) -> None:
        self._classes: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._classes is None:
            import tidings

            classes: dict[str, Any] = {}
            for info in pkgutil.walk_packages(tidings.__path__, "tidings."):
                if info.name.endswith("_pb2"):
                    module = importlib.import_module(info.name)
                    for short, descriptor in module.DESCRIPTOR.message_types_by_name.items():
                        classes.setdefault(short, message_factory.GetMessageClass(descriptor))
            self._classes = classes
        try:
            return self._classes[name]
        except KeyError:
            raise AttributeError(name) from None


#: Message classes by short name.
M = _Messages()
