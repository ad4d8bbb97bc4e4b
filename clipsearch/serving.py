"""What both services share: an aio gRPC server with health, reflection, limits,
token auth, TLS, one log line per request, and a graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clipsearch import metrics
from clipsearch.options import option

log = logging.getLogger("clipsearch.serving")

HEALTH_SERVICE = "grpc.health.v1.Health"
# Calls that never need a token: orchestrators probe health without secrets.
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")
REQUEST_ID_KEY = "x-request-id"


@dataclass
class ServerConfig:
    """Settings every service has; each service's config extends this."""

    host: str = option("address to bind", default="127.0.0.1")
    port: int = option("port to listen on (0: any free port)", default=0)
    max_message_mb: float = option("largest request or response message, MiB", default=64.0)
    token: str = option("when set, every RPC but health needs 'authorization: Bearer <token>'",
                        default="")
    tls_cert: str = option("PEM certificate: serve TLS", default="")
    tls_key: str = option("PEM private key for --tls-cert", default="")
    tls_ca: str = option("PEM CA bundle: require client certificates signed by it (mTLS)",
                         default="")
    grace_s: float = option("on SIGTERM, how long in-flight calls may finish", default=10.0)
    log_json: bool = option("log one JSON object per line", default=False)
    metrics_port: int = option("serve Prometheus metrics on http://HOST:PORT/metrics "
                               "(0: off)", default=0)


class MalformedRequest:
    """Stands in for a request whose bytes did not parse, so the handler can say why
    (INVALID_ARGUMENT naming the field) instead of gRPC's generic INTERNAL."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def explain_decode_error(descriptor: Any, data: bytes, path: str = "") -> str:
    """Walks the wire format to name the string field that is not UTF-8 ("texts[3]")."""
    counts: dict[str, int] = {}
    pos = 0
    try:
        while pos < len(data):
            key, pos = _read_varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _read_varint(data, pos)
                continue
            if wire in (1, 5):
                pos += 8 if wire == 1 else 4
                continue
            if wire != 2:
                return "malformed protobuf"
            length, pos = _read_varint(data, pos)
            chunk, pos = data[pos:pos + length], pos + length
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            index = counts.get(field.name, 0)
            counts[field.name] = index + 1
            name = f"{path}{field.name}"
            if field.is_repeated:
                name += f"[{index}]"
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return f"{name} is not valid UTF-8 (byte {exc.start})"
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                inner = explain_decode_error(field.message_type, chunk, name + ".")
                if inner != "malformed protobuf":
                    return inner
    except (DecodeError, IndexError):
        pass
    return "malformed protobuf"


def _safe_deserializer(cls: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    def deserialize(data: bytes) -> Message | MalformedRequest:
        try:
            return cls.FromString(data)
        except DecodeError:
            try:
                return MalformedRequest(explain_decode_error(cls.DESCRIPTOR, data))
            except Exception:  # explaining must never turn INVALID_ARGUMENT into UNKNOWN
                return MalformedRequest("malformed protobuf")
    return deserialize


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: Any) -> None:
    """Registers `servicer` for every method of `service`, like the generated
    add_*Servicer_to_server, but with deserializers that turn bad bytes (a string
    that is not UTF-8) into INVALID_ARGUMENT rather than INTERNAL."""
    handlers = {}
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[
            (method.client_streaming, method.server_streaming)]
        if not method.client_streaming:
            behaviour = _reject_malformed(behaviour)
        handlers[method.name] = kind(behaviour,
                                     request_deserializer=_safe_deserializer(request_cls),
                                     response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name,
                                                                          handlers),))


def _reject_malformed(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    if asyncio.iscoroutinefunction(behaviour):
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, MalformedRequest):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            return await behaviour(request, context)
        return unary

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        async for item in behaviour(request, context):
            yield item
    return streaming


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's x-request-id, or a new one; passed on to downstream calls."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return str(value)
    return uuid.uuid4().hex[:16]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every method but health/reflection."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        # compare_digest: the time taken does not reveal how much of the token matched.
        if hmac.compare_digest(given_bytes, self._expected):
            return await continuation(details)
        return _deny_handler(await continuation(details))


def _deny_handler(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong token: send 'authorization: Bearer <token>'")

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await deny(request, context)
        yield  # pragma: no cover - abort raises first

    if handler is not None and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream) if handler.request_streaming \
            else grpc.unary_stream_rpc_method_handler(deny_stream)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    """One log line per finished request: method, status, milliseconds, request id."""

    def __init__(self, on_done: Callable[[str, str, float], None] = metrics.observe_request
                 ) -> None:
        self._on_done = on_done

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        method = details.method
        done = self._done

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start, failure = time.perf_counter(), None
                try:
                    return await inner(request, context)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    done(method, context, start, failure)
            return handler._replace(unary_unary=unary_unary)
        if handler.stream_stream:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                start, failure = time.perf_counter(), None
                try:
                    async for item in inner_ss(requests, context):
                        yield item
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    done(method, context, start, failure)
            return handler._replace(stream_stream=stream_stream)
        return handler

    def _done(self, method: str, context: grpc.aio.ServicerContext, start: float,
              failure: BaseException | None) -> None:
        ms = (time.perf_counter() - start) * 1000
        code = context.code() if hasattr(context, "code") else None
        if isinstance(code, grpc.StatusCode):  # set by abort() or set_code()
            status = code.name
        elif isinstance(failure, asyncio.CancelledError):
            status = "CANCELLED"  # the caller went away, or its deadline passed first
        else:
            status = "OK" if failure is None else "UNKNOWN"
        log.info("rpc done", extra={"rpc": method, "status": status, "ms": round(ms, 2),
                                    "request_id": request_id(context)})
        self._on_done(method.rsplit("/", 1)[-1], status, ms / 1000)


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    key = Path(config.tls_key).read_bytes()
    cert = Path(config.tls_cert).read_bytes()
    ca = Path(config.tls_ca).read_bytes() if config.tls_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def message_options(max_message_mb: float) -> list[tuple[str, int]]:
    size = int(max_message_mb * 1024 * 1024)
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]


class Service:
    """An aio server carrying one clipsearch service plus health and reflection.

    Health starts NOT_SERVING; the service calls `set_serving(True)` once it is ready
    (the encoder after its model is loaded and warmed)."""

    def __init__(self, config: ServerConfig, service: ServiceDescriptor, servicer: Any,
                 extra_interceptors: Iterable[grpc.aio.ServerInterceptor] = ()) -> None:
        interceptors: list[grpc.aio.ServerInterceptor] = [AccessLogInterceptor(),
                                                          *extra_interceptors]
        if config.token:
            interceptors.insert(0, AuthInterceptor(config.token))
        self.config = config
        self.name = service.full_name
        self.server = grpc.aio.server(interceptors=interceptors,
                                      options=message_options(config.max_message_mb))
        add_service(self.server, service, servicer)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (self.name, HEALTH_SERVICE, reflection.SERVICE_NAME), self.server)
        address = f"{config.host}:{config.port}"
        credentials = server_credentials(config)
        self.port = (self.server.add_secure_port(address, credentials) if credentials
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")

    async def start(self) -> None:
        await self.set_serving(False)
        await self.server.start()
        metrics.serve_metrics(self.config.host, self.config.metrics_port)

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", self.name):
            await self.health.set(name, status)

    async def stop(self) -> None:
        """Health goes NOT_SERVING first, then new calls are refused and in-flight
        ones get `grace_s` to finish."""
        await self.set_serving(False)
        await self.server.stop(self.config.grace_s)


async def serve_until_stopped(service: Service, prepare: Awaitable[None],
                              close: Callable[[], Awaitable[None]], what: str,
                              expected_errors: tuple[type[BaseException], ...] = ()) -> int:
    """The life of a service process: listen at once with health NOT_SERVING, run
    `prepare` (load the model, open the collection), serve as SERVING until SIGTERM or
    SIGINT, then stop gracefully. Returns the exit code: 0, or 2 when `prepare` failed
    (an expected error is logged as its message alone, anything else with its trace)."""
    await service.start()
    log.info("%s listening on %s:%d; NOT_SERVING until ready", what, service.config.host,
             service.port)
    stop = stop_event_on_signals()
    preparing = asyncio.ensure_future(prepare)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({preparing, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if preparing.done() and preparing.exception() is not None:
        error = preparing.exception()
        trace = None if isinstance(error, expected_errors) else error
        log.error("cannot start: %s", error, exc_info=trace)
        await service.server.stop(0)
        await close()
        return 2
    if not stop.is_set():
        # What startup made (modules, the model, Milvus Lite's tables) lives as long as the
        # process: moved out of the collector's sight, a full collection no longer scans it
        # (measured: a 220 ms pause in the search service under load before, none after).
        gc.collect()
        gc.freeze()
        await service.set_serving(True)
        log.info("%s SERVING on port %d", what, service.port)
        await stopping
    log.info("stopping: health NOT_SERVING, %.0f s grace for in-flight calls",
             service.config.grace_s)
    preparing.cancel()
    await service.stop()
    await close()
    return 0


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so `serve` loops can stop gracefully."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event
