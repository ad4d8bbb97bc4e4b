"""The server interceptor that applies clipsearch/access.py, clipsearch/limits.py and
clipsearch/audit.py to every call but health and reflection.

In order, at the start of each call: the token (missing or unknown: UNAUTHENTICATED), the
scope the method needs (absent from the token: PERMISSION_DENIED naming it), the caller's
limits for that scope (over one: RESOURCE_EXHAUSTED with `retry-after-ms` in the trailing
metadata). The token table is read at each call, so a reload takes effect from the next
call while calls in flight finish. When the call ends: metrics by token name, and an audit
line for the calls of the `index` and `admin` scopes.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from clipsearch import audit, metrics
from clipsearch.access import ADMIN, INDEX, AccessControl, Caller, scope_of
from clipsearch.limits import RETRY_AFTER_KEY, Limits

log = logging.getLogger("clipsearch.access")

AUDITED_SCOPES = (INDEX, ADMIN)
UNKNOWN_CALLER = "unknown"

# The caller of the call being served (None without tokens): servicers may read it.
CURRENT_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "clipsearch_caller", default=None)


@dataclass
class _Call:
    """One admitted call, from its start to its end."""

    method: str
    scope: str
    caller: Caller
    limited: bool
    started: float = field(default_factory=time.perf_counter)
    target: str = ""
    tally: audit.Tally = field(default_factory=audit.Tally)
    failure: BaseException | None = None


def _status(context: grpc.aio.ServicerContext, failure: BaseException | None) -> str:
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(failure, asyncio.CancelledError):
        return "CANCELLED"
    return "OK" if failure is None else "UNKNOWN"


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return str(value)
    return uuid.uuid4().hex[:16]


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Tokens, scopes, per-caller limits, metrics and the audit trail (module doc)."""

    def __init__(self, access: AccessControl, limits: Limits,
                 open_methods: tuple[str, ...]) -> None:
        self.access = access
        self.limits = limits
        self._open = open_methods

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._open):
            return handler
        return self._wrap(handler, details.method)

    async def _enter(self, method: str, context: grpc.aio.ServicerContext,
                     request: Any) -> _Call:
        """Admits the call or aborts it with the status saying why."""
        name = method.rsplit("/", 1)[-1]
        scope = scope_of(method)
        caller = self.access.authenticate(context.invocation_metadata())
        if caller is None:
            await self._refuse(context, UNKNOWN_CALLER, name, "unauthenticated",
                               grpc.StatusCode.UNAUTHENTICATED,
                               "missing or unknown token: send 'authorization: Bearer <token>'")
        assert caller is not None
        if scope not in caller.scopes:
            await self._refuse(context, caller.name, name, "permission",
                               grpc.StatusCode.PERMISSION_DENIED,
                               f"token {caller.name!r} lacks the {scope!r} scope, which {name} "
                               f"needs (it has: {', '.join(sorted(caller.scopes))})")
        call = _Call(method, scope, caller, caller.limited)
        if scope in AUDITED_SCOPES and request is not None:
            call.target = audit.describe_request(request)
        if caller.limited:  # last: an admitted call holds a slot until _leave
            refusal = self.limits.admit(caller.name, scope)
            if refusal is not None:
                wait_ms = max(1, math.ceil(refusal.retry_after_s * 1000)) \
                    if math.isfinite(refusal.retry_after_s) else 3_600_000
                await self._refuse(context, caller.name, name, refusal.reason,
                                   grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{refusal.message}; retry in {wait_ms} ms",
                                   ((RETRY_AFTER_KEY, str(wait_ms)),))
        CURRENT_CALLER.set(caller)
        return call

    async def _refuse(self, context: grpc.aio.ServicerContext, caller: str, method: str,
                      reason: str, code: grpc.StatusCode, message: str,
                      trailing: tuple[tuple[str, str], ...] = ()) -> None:
        metrics.CALLER_REFUSALS.labels(caller, method, reason).inc()
        log.warning("refused %s from %s (%s): %s", method, context.peer(), caller, reason,
                    extra={"rpc": method, "status": code.name, "caller": caller,
                           "peer": context.peer()})
        await context.abort(code, message, trailing_metadata=trailing)

    def _leave(self, call: _Call, context: grpc.aio.ServicerContext) -> None:
        if call.limited:
            self.limits.release(call.caller.name, call.scope)
        name = call.method.rsplit("/", 1)[-1]
        status = _status(context, call.failure)
        metrics.CALLER_REQUESTS.labels(call.caller.name, name, status).inc()
        if call.scope in AUDITED_SCOPES:
            # A unary call names its ids or filter; a stream (Index) its items' tally.
            target = call.target or call.tally.summary() or f"items={call.tally.responses}"
            audit.record(name, call.caller.name, context.peer(), target, call.tally.rows,
                         status, _request_id(context),
                         (time.perf_counter() - call.started) * 1000)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        enter, leave = self._enter, self._leave
        takes_stream = handler.request_streaming

        def bind(inner: Any) -> Any:
            if handler.response_streaming:
                # An async generator function itself: grpc tells the kinds of handler apart
                # with inspect (a plain function returning a generator would run on a thread).
                async def stream_behaviour(request: Any, context: grpc.aio.ServicerContext
                                           ) -> AsyncIterator[Any]:
                    call = await enter(method, context, None if takes_stream else request)
                    try:
                        async for response in inner(request, context):
                            call.tally.add(response)
                            yield response
                    except BaseException as exc:
                        call.failure = exc
                        raise
                    finally:
                        leave(call, context)
                return stream_behaviour

            async def unary_behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call = await enter(method, context, None if takes_stream else request)
                try:
                    response = await inner(request, context)
                    call.tally.add(response)
                    return response
                except BaseException as exc:
                    call.failure = exc
                    raise
                finally:
                    leave(call, context)
            return unary_behaviour

        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            inner = getattr(handler, kind)
            if inner is not None:
                return handler._replace(**{kind: bind(inner)})  # type: ignore[attr-defined]
        return handler
