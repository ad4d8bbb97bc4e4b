"""A gRPC load generator that reads ghz config files and prints what ghz prints.

    python -m benchmarks.loadgen --config loadtest/encode_text.json -c 32 -n 2000

It drives any unary RPC of our protos with a given concurrency, a total count or a
duration, and an optional rate limit; ghz users get the same numbers from the same file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor

from clipsearch.encoder.v1 import encoder_pb2
from clipsearch.search.v1 import search_pb2

FILES = (encoder_pb2.DESCRIPTOR, search_pb2.DESCRIPTOR)
PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
# The ghz template actions we fill in; others are left as they are (and then fail to parse).
TEMPLATE_ACTION = re.compile(r"\{\{\s*\.(RequestNumber|UUID|TimestampUnix)\s*\}\}")


def find_method(call: str) -> MethodDescriptor:
    """'clipsearch.encoder.v1.Encoder.EncodeText' (or .../EncodeText) -> its descriptor."""
    service_name, _, method_name = call.replace("/", ".").rpartition(".")
    for file in FILES:
        for service in file.services_by_name.values():
            if service.full_name == service_name and method_name in service.methods_by_name:
                return service.methods_by_name[method_name]
    raise ValueError(f"no RPC {call!r} in clipsearch's protos")


def parse_duration(text: str | float | int) -> float:
    if isinstance(text, int | float):
        return float(text)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    if not match:
        raise ValueError(f"bad duration {text!r} (e.g. 500ms, 10s, 2m)")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


@dataclass
class LoadConfig:
    """The subset of ghz's config that our RPCs need."""

    call: str
    host: str = "127.0.0.1:50051"
    data: dict[str, Any] = field(default_factory=dict)
    binary_file: str = ""
    concurrency: int = 50
    total: int = 200
    duration_s: float = 0.0  # when set, overrides total
    rps: float = 0.0  # 0: as fast as possible
    timeout_s: float = 20.0
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> LoadConfig:
        raw = json.loads(Path(path).read_text())
        binary = raw.get("binary-file", "")
        if binary and not Path(binary).exists():  # relative to the config, not the cwd
            binary = str(Path(path).parent / binary)
        return cls(call=raw["call"], host=raw.get("host", cls.host), data=raw.get("data") or {},
                   binary_file=binary if raw.get("binary") else "",
                   concurrency=int(raw.get("concurrency", cls.concurrency)),
                   total=int(raw.get("total", cls.total)),
                   duration_s=parse_duration(raw["duration"]) if raw.get("duration") else 0.0,
                   rps=float(raw.get("rps", 0)),
                   timeout_s=parse_duration(raw.get("timeout", "20s")),
                   metadata=dict(raw.get("metadata") or {}))

    def requests(self) -> Callable[[int], Any]:
        """The request message of call n (0-based), from the config's binary file or its
        data (protojson), where ghz's {{.RequestNumber}}, {{.UUID}} and {{.TimestampUnix}}
        are filled in per call."""
        cls = message_factory.GetMessageClass(find_method(self.call).input_type)
        if self.binary_file:
            fixed = cls.FromString(Path(self.binary_file).read_bytes())
            return lambda number: fixed
        template = json.dumps(self.data)
        if not TEMPLATE_ACTION.search(template):
            fixed = json_format.ParseDict(self.data, cls())
            return lambda number: fixed

        def render(number: int) -> Any:
            values = {"RequestNumber": str(number), "UUID": str(uuid.uuid4()),
                      "TimestampUnix": str(int(time.time()))}
            return json_format.Parse(
                TEMPLATE_ACTION.sub(lambda m: values[m.group(1)], template), cls())
        return render


@dataclass
class Report:
    """What ghz's summary shows."""

    latencies_s: list[float]
    statuses: Counter[str]
    total_s: float

    @property
    def count(self) -> int:
        return sum(self.statuses.values())

    @property
    def rps(self) -> float:
        return self.count / self.total_s if self.total_s else 0.0

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_s)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]

    def to_dict(self) -> dict[str, Any]:
        ms = [x * 1000 for x in self.latencies_s] or [float("nan")]
        return {"count": self.count, "total_s": self.total_s, "rps": self.rps,
                "fastest_ms": min(ms), "slowest_ms": max(ms), "average_ms": statistics.fmean(ms),
                **{f"p{p}_ms": self.percentile(p) * 1000 for p in PERCENTILES},
                "statuses": dict(self.statuses)}

    def format(self) -> str:
        d = self.to_dict()
        lines = ["", "Summary:", f"  Count:\t{d['count']}",
                 f"  Total:\t{self.total_s * 1000:.2f} ms",
                 f"  Slowest:\t{d['slowest_ms']:.2f} ms", f"  Fastest:\t{d['fastest_ms']:.2f} ms",
                 f"  Average:\t{d['average_ms']:.2f} ms", f"  Requests/sec:\t{d['rps']:.2f}",
                 "", "Latency distribution:"]
        lines += [f"  {p} % in {d[f'p{p}_ms']:.2f} ms " for p in PERCENTILES]
        lines += ["", "Status code distribution:"]
        lines += [f"  [{name}]   {n} responses" for name, n in self.statuses.most_common()]
        return "\n".join(lines)


async def run(config: LoadConfig) -> Report:
    """Sends the configured requests; every call's latency and status is recorded."""
    method = find_method(config.call)
    requests = config.requests()
    request_type = type(requests(0))  # also checks the data before the run starts
    response_cls = message_factory.GetMessageClass(method.output_type)
    metadata = tuple(config.metadata.items())
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(config.host, options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20)]) as channel:
        call = channel.unary_unary(f"/{method.containing_service.full_name}/{method.name}",
                                   request_serializer=request_type.SerializeToString,
                                   response_deserializer=response_cls.FromString)
        started = time.perf_counter()
        end = started + config.duration_s if config.duration_s else None
        issued = 0

        def next_ticket() -> tuple[int, float] | None:
            """The number of this worker's next call and when it may start, or None when
            the run is over."""
            nonlocal issued
            if (end is None and issued >= config.total) or (end and time.perf_counter() >= end):
                return None
            issued += 1
            return issued - 1, started + (issued - 1) / config.rps if config.rps else 0.0

        async def worker() -> None:
            while (ticket := next_ticket()) is not None:
                number, at = ticket
                if at:
                    await asyncio.sleep(max(0.0, at - time.perf_counter()))
                request = requests(number)
                t0 = time.perf_counter()
                try:
                    await call(request, timeout=config.timeout_s, metadata=metadata)
                    statuses["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    statuses[exc.code().name] += 1
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(config.concurrency)))
        total = time.perf_counter() - started
    return Report(latencies, statuses, total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a ghz JSON config (loadtest/*.json)")
    parser.add_argument("--host", help="override the config's host")
    parser.add_argument("-c", "--concurrency", type=int)
    parser.add_argument("-n", "--total", type=int)
    parser.add_argument("-z", "--duration", help="e.g. 30s (overrides --total)")
    parser.add_argument("--rps", type=float, help="rate limit, requests per second")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    config = LoadConfig.from_file(args.config)
    config.host = args.host or config.host
    config.concurrency = args.concurrency or config.concurrency
    config.total = args.total or config.total
    config.duration_s = parse_duration(args.duration) if args.duration else config.duration_s
    config.rps = args.rps if args.rps is not None else config.rps
    report = asyncio.run(run(config))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if set(report.statuses) <= {"OK"} else 1


if __name__ == "__main__":
    sys.exit(main())
