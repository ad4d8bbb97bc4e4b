"""What both services share: an aio gRPC server with health, reflection, limits,
scoped tokens and per-caller limits (clipsearch/access.py, limits.py, gate.py), TLS, one log
line per request, and a graceful stop on SIGTERM/SIGINT. SIGHUP stops the service too, unless
it has a token file or TLS files: then SIGHUP reloads them (rotation without a restart)."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clipsearch import lifecycle, metrics
from clipsearch.access import AccessControl, TokenFileError
from clipsearch.certificates import CertificateError, ReloadableCertificates
from clipsearch.gate import CURRENT_CALLER, AccessInterceptor
from clipsearch.grpc_options import message_options
from clipsearch.limits import Limits, parse_limits
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
    token_file: str = option("file of named tokens with scopes (search, index, admin), one a "
                             "line: 'NAME TOKEN|sha256:HEX SCOPES [unlimited]'; SIGHUP "
                             "reloads it (README, Security)", default="")
    rate_limit: str = option("calls per second per token name and scope: "
                             "'search=50/100,index=5' (RATE[/BURST], *= every scope; "
                             "empty: none)", default="")
    concurrency_limit: str = option("calls at once per token name and scope: "
                                    "'search=16,index=2' (*= every scope; empty: none)",
                                    default="")
    tls_cert: str = option("PEM certificate: serve TLS", default="")
    tls_key: str = option("PEM private key for --tls-cert", default="")
    tls_ca: str = option("PEM CA bundle: require client certificates signed by it (mTLS)",
                         default="")
    grace_s: float = option("on SIGTERM, how long in-flight calls may finish", default=10.0)
    log_json: bool = option("log one JSON object per line", default=False)
    metrics_port: int = option("serve Prometheus metrics on http://HOST:PORT/metrics "
                               "(0: off)", default=0)
    max_connection_age_s: float = option(
        "close each client connection after this long (gRPC GOAWAY; calls in flight finish), "
        "so clients re-resolve DNS and spread over replicas that joined since (0: never)",
        default=15.0)


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
        extra = {"rpc": method, "status": status, "ms": round(ms, 2),
                 "request_id": request_id(context)}
        caller = CURRENT_CALLER.get()  # the token's name, where tokens are in use
        if caller is not None:
            extra["caller"] = caller.name
        log.info("rpc done", extra=extra)
        self._on_done(method.rsplit("/", 1)[-1], status, ms / 1000)


def is_loopback(host: str) -> bool:
    """True when `host` (a --host value) is reachable from this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:  # a name: loopback when everything it resolves to is
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback
                               for info in infos)


def warn_if_exposed(config: ServerConfig, port: int) -> bool:
    """Logs a warning (and returns True) when the service listens beyond loopback and
    nothing authenticates callers: no --token and no client certificates (--tls-ca)."""
    if is_loopback(config.host) or config.token or config.token_file or config.tls_ca:
        return False
    metrics_note = (f"; its metrics on port {config.metrics_port} are open too"
                    if config.metrics_port else "")
    log.warning("listening on %s:%d, beyond loopback, with no --token and no client "
                "certificates: anyone who can reach this port can call every method%s. "
                "Set --token, or listen on 127.0.0.1 (--host)", config.host, port,
                metrics_note)
    return True


class ServiceConfigError(ValueError):
    """A setting the service cannot start with (a bad token file, TLS files, limits)."""


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The server's channel arguments: message limits and the connection age."""
    options = message_options(config.max_message_mb)
    if config.max_connection_age_s > 0:
        # gRPC adds +-10% jitter, so replicas' clients do not all reconnect at once. No
        # grace limit: a long Index stream is never cut, only new calls move.
        options.append(("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)))
    return options


class Service:
    """An aio server carrying one clipsearch service plus health and reflection.

    Health starts NOT_SERVING; the service calls `set_serving(True)` once it is ready
    (the encoder after its model is loaded and warmed)."""

    def __init__(self, config: ServerConfig, service: ServiceDescriptor, servicer: Any,
                 extra_interceptors: Iterable[grpc.aio.ServerInterceptor] = ()) -> None:
        interceptors: list[grpc.aio.ServerInterceptor] = [AccessLogInterceptor(),
                                                          *extra_interceptors]
        try:  # tokens, scopes, limits, audit: clipsearch/access.py, limits.py, gate.py
            self.access = AccessControl(config.token, config.token_file)
            limits = Limits(parse_limits(config.rate_limit, config.concurrency_limit))
            if limits.enabled and not self.access.enabled:
                raise ValueError("--rate-limit and --concurrency-limit count per token: "
                                 "they need --token or --token-file")
            self.certificates = (ReloadableCertificates(config.tls_cert, config.tls_key,
                                                        config.tls_ca)
                                 if config.tls_cert else None)
        except (TokenFileError, CertificateError, ValueError) as exc:
            raise ServiceConfigError(str(exc)) from None
        if self.access.enabled:
            interceptors.insert(0, AccessInterceptor(self.access, limits, OPEN_METHODS))
        self.config = config
        self.name = service.full_name
        self.server = grpc.aio.server(interceptors=interceptors,
                                      options=server_options(config))
        add_service(self.server, service, servicer)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (self.name, HEALTH_SERVICE, reflection.SERVICE_NAME), self.server)
        address = f"{config.host}:{config.port}"
        credentials = self.certificates.credentials() if self.certificates else None
        self.port = (self.server.add_secure_port(address, credentials) if credentials
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")

    async def start(self) -> None:
        await self.set_serving(False)
        await self.server.start()
        metrics.serve_metrics(self.config.host, self.config.metrics_port)
        warn_if_exposed(self.config, self.port)

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

    @property
    def reloadable(self) -> bool:
        """Whether SIGHUP has something to reload: a token file or TLS files."""
        return bool(self.access.token_file or self.certificates)

    def reload(self) -> None:
        """Reads the token file and the TLS files again (SIGHUP). Calls in flight finish as
        they began; the next call sees the new tokens, the next connection the new
        certificate. A file that does not pass keeps what is in force (logged)."""
        log.info("SIGHUP: reloading%s%s", " the token file" if self.access.token_file else "",
                 " the TLS certificate" if self.certificates else "")
        if self.access.token_file:
            self.access.reload()
        if self.certificates is not None:
            self.certificates.reload()


async def serve_until_stopped(service: Service, prepare: Awaitable[None],
                              close: Callable[[], Awaitable[None]], what: str,
                              expected_errors: tuple[type[BaseException], ...] = (),
                              failed: asyncio.Event | None = None) -> int:
    """The life of a service process: listen at once with health NOT_SERVING, run
    `prepare` (load the model, open the collection), serve as SERVING until SIGTERM,
    SIGINT or SIGHUP (or the end of the parent that watches it), then stop gracefully; a
    service that can reload (`Service.reloadable`) reloads on SIGHUP instead.
    Returns the exit code: 0, or 2 when `prepare` failed (an expected error is logged
    as its message alone, anything else with its trace), or 3 when the service set
    `failed` (it cannot go on: health turns NOT_SERVING at once and the process ends, for
    its supervisor to start a new one)."""
    await service.start()
    log.info("%s listening on %s:%d; NOT_SERVING until ready", what, service.config.host,
             service.port)
    stop = stop_event_on_signals(service.reload if service.reloadable else None)
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
        failing = asyncio.ensure_future((failed or asyncio.Event()).wait())
        await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
        failing.cancel()
        if failed is not None and failed.is_set():
            log.error("%s cannot go on (see the error above): health NOT_SERVING, "
                      "exiting with 3 for a restart", what)
            await service.stop()
            await close()
            return 3
    log.info("stopping: health NOT_SERVING, %.0f s grace for in-flight calls",
             service.config.grace_s)
    preparing.cancel()
    await service.stop()
    await close()
    return 0


def stop_event_on_signals(reload: Callable[[], None] | None = None) -> asyncio.Event:
    """An event set by SIGTERM, SIGINT or SIGHUP, so `serve` loops can stop gracefully;
    also set when the parent that watches this process (`clipsearch up`) goes away.
    With `reload` (a service with a token file or TLS files), SIGHUP calls it instead."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, event.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)
    lifecycle.watch_parent(loop, event.set)
    return event
