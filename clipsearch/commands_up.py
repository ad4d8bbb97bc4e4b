"""`clipsearch up`: an encoder and a search service (Milvus Lite by default) as children that
never outlive it.

* Its flags are the services' own settings (model, device, precision, batching, Milvus,
  ports, tokens), defined once in their config dataclasses: same help, same defaults, same
  CLIPSEARCH_ENCODER_* / CLIPSEARCH_SEARCH_* variables. Tokens reach the children through
  their environment, not their command line (which `ps` shows).
* SIGTERM, SIGINT or SIGHUP stop the search service and then the encoder, each gracefully
  (in-flight calls drain), and `up` exits 0. If `up` itself is killed, even by SIGKILL,
  the children stop on their own (clipsearch/lifecycle.py). Where a service has a token
  file (`--token-file`, `--encoder-token-file`) or TLS files, SIGHUP instead reloads them:
  `up` passes it on to those services and nothing stops.
* A child that ends before it is ready stops the other; `up` prints one line naming the
  service and its reason (the children's own log lines come before it) and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Any

from clipsearch import lifecycle
from clipsearch.options import add_options, env_name, from_namespace, option, to_arguments

# What `up` takes from each service's config: {field: up's flag (as a dest)}. Fields not
# named here still reach the children through their own environment variables.
ENCODER_FLAGS = {"model": "model", "weights_dir": "weights_dir", "download": "download",
                 "device": "device", "precision": "precision", "max_batch": "max_batch",
                 "max_delay_ms": "max_delay_ms", "max_queue": "max_queue",
                 "port": "encoder_port", "token": "encoder_token",
                 "token_file": "encoder_token_file"}
SEARCH_FLAGS = {"host": "host", "port": "port", "milvus": "milvus",
                "milvus_token": "milvus_token", "collection": "collection",
                "index_type": "index_type", "token": "token", "token_file": "token_file"}
SECRETS = ("token", "milvus_token")  # passed in the environment
ENCODER_HOST = "127.0.0.1"  # the encoder is up's own: only its search service calls it
UP_ENV_PREFIX = "CLIPSEARCH_UP_"


@dataclass
class UpConfig:
    """Settings of `up` itself."""

    wait: float = option("seconds to wait for both services to be ready", default=600.0)
    stop_timeout: float = option("seconds each service gets to stop before it is killed",
                                 default=30.0)
    log_json: bool = option("both services log one JSON object per line", default=False)


def add_up_options(parser: argparse.ArgumentParser) -> None:
    """The flags of `up`: its own, then the encoder's and the search service's it forwards."""
    from encoder_service.config import ENV_PREFIX as ENCODER_ENV
    from encoder_service.config import EncoderConfig
    from search_service.config import ENV_PREFIX as SEARCH_ENV
    from search_service.config import SearchConfig

    add_options(parser, UpConfig, UP_ENV_PREFIX)
    add_options(parser.add_argument_group("encoder service"), EncoderConfig,  # type: ignore[arg-type]
                ENCODER_ENV, ENCODER_FLAGS)
    add_options(parser.add_argument_group("search service"), SearchConfig,  # type: ignore[arg-type]
                SEARCH_ENV, SEARCH_FLAGS)


@dataclass
class ChildSpec:
    """How to start one service: its name, command line and extra environment."""

    name: str
    argv: list[str]
    env: dict[str, str]
    address: str  # where to ask its health, on this machine
    reloads_on_hup: bool = False  # it has a token file or TLS files: SIGHUP reloads them


def child_specs(args: argparse.Namespace) -> list[ChildSpec]:
    """The encoder's and the search service's settings, from `up`'s arguments."""
    from encoder_service.config import ENV_PREFIX as ENCODER_ENV
    from encoder_service.config import EncoderConfig
    from search_service.config import ENV_PREFIX as SEARCH_ENV
    from search_service.config import SearchConfig

    up = from_namespace(UpConfig, args)
    # (a field a service no longer has is not forwarded: add_options skipped it too)
    encoder = {name: getattr(args, dest) for name, dest in ENCODER_FLAGS.items()
               if hasattr(args, dest)}
    search = {name: getattr(args, dest) for name, dest in SEARCH_FLAGS.items()
              if hasattr(args, dest)}
    encoder["host"] = ENCODER_HOST
    search["encoder"] = f"{ENCODER_HOST}:{encoder['port']}"
    search["encoder_token"] = encoder["token"]
    for values in (encoder, search):
        values["log_json"] = up.log_json
    python = [sys.executable, "-m", "clipsearch.cli", "serve"]

    def split(values: dict[str, Any], config: type, prefix: str, name: str, address: str
              ) -> ChildSpec:
        secret = {k: v for k, v in values.items() if k.endswith(SECRETS)}
        public = {k: v for k, v in values.items() if k not in secret}
        # The service reloads on SIGHUP (instead of stopping) when it has these files.
        reloads = bool(values.get("token_file") or os.environ.get(env_name(prefix, "tls_cert")))
        return ChildSpec(name, [*python, name, *to_arguments(config, public)],
                         {env_name(prefix, k): str(v) for k, v in secret.items()}, address,
                         reloads)

    local = "127.0.0.1" if search["host"] in ("0.0.0.0", "::", "") else search["host"]
    return [split(encoder, EncoderConfig, ENCODER_ENV, "encoder",
                  f"{ENCODER_HOST}:{encoder['port']}"),
            split(search, SearchConfig, SEARCH_ENV, "search", f"{local}:{search['port']}")]


@dataclass
class Child:
    """A running service: its process, and its stderr passed through to ours."""

    spec: ChildSpec
    process: subprocess.Popen[bytes]
    last_error: str = ""
    last_line: str = ""
    _reader: threading.Thread | None = field(default=None, repr=False)

    def forward_output(self, sink: IO[str]) -> None:
        """Copies the child's stderr to `sink` line by line, remembering why it failed."""
        def pump() -> None:
            assert self.process.stderr is not None
            for raw in self.process.stderr:
                line = raw.decode(errors="replace")
                try:
                    sink.write(line)
                    sink.flush()
                except (OSError, ValueError):
                    pass
                text = _message(line)
                if text:
                    self.last_line = text
                if "cannot start:" in text:
                    self.last_error = text.split("cannot start:", 1)[1].strip()
        self._reader = threading.Thread(target=pump, name=f"{self.spec.name}-log", daemon=True)
        self._reader.start()

    def reason(self) -> str:
        """Why the child ended, in its own words where it gave them."""
        if self._reader is not None:
            self._reader.join(2.0)  # its last lines
        code = self.process.returncode
        said = self.last_error or self.last_line
        return f"{said} (exit code {code})" if said else f"exit code {code}"

    def stop(self, timeout_s: float) -> int:
        """SIGTERM, then SIGKILL after `timeout_s`; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                print(f"clipsearch up: the {self.spec.name} service did not stop within "
                      f"{timeout_s:.0f} s: killed", file=sys.stderr, flush=True)
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(2.0)
        return int(self.process.returncode)


def _message(line: str) -> str:
    """The message of a log line, plain or JSON."""
    line = line.strip()
    if line.startswith("{"):
        try:
            entry = json.loads(line)
        except ValueError:
            return line
        return str(entry.get("message", line)) if isinstance(entry, dict) else line
    return line


class Stopper:
    """Records the first of SIGTERM, SIGINT, SIGHUP (installed over any inherited
    SIG_IGN: a background job of a non-interactive shell starts with SIGINT ignored).
    With `hup_reloads`, SIGHUP sets `reload` instead: the services that can reload (a
    token file, TLS files) are sent SIGHUP, and nothing stops."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, hup_reloads: bool = False) -> None:
        self.event = threading.Event()
        self.reload = threading.Event()
        self.hup_reloads = hup_reloads
        self.signal: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGHUP and self.hup_reloads:
            self.reload.set()
            return
        if self.signal is None:
            self.signal = sig
        self.event.set()


def start_child(spec: ChildSpec, watch_fd: int) -> Child:
    """Starts one service as a child that follows this process (clipsearch/lifecycle.py)."""
    env: Mapping[str, str] = {**os.environ, **spec.env, **lifecycle.child_environment(watch_fd)}
    # A session of its own: a terminal's Ctrl-C or hang-up reaches `up` alone, which then
    # stops the services in order (search first) instead of both dying at once.
    process = subprocess.Popen(spec.argv, env=dict(env), stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, pass_fds=(watch_fd,),
                               start_new_session=True)
    return Child(spec, process)


def run_up(args: argparse.Namespace) -> int:
    """The `up` command: start both, wait until ready, run until told to stop. Exits 0
    when stopped by a signal and both services stopped cleanly, else 1."""
    up = from_namespace(UpConfig, args)
    specs = child_specs(args)
    stopper = Stopper(hup_reloads=any(spec.reloads_on_hup for spec in specs))
    # The read end goes to each child; only this process holds the write end, so the
    # children see end-of-file when it exits, however it exits.
    watch_read, watch_write = os.pipe()
    children: list[Child] = []
    try:
        try:
            for spec in specs:
                children.append(start_child(spec, watch_read))
        finally:
            os.close(watch_read)
        for child in children:
            child.forward_output(sys.stderr)
        result = _supervise(children, stopper, up, args)
    finally:
        # The search service first: it drains its calls while the encoder still answers.
        codes = {child.spec.name: child.stop(up.stop_timeout) for child in reversed(children)}
        os.close(watch_write)
    if result == 0 and any(codes.values()):
        print(f"clipsearch up: a service did not stop cleanly (exit codes: {codes})",
              file=sys.stderr, flush=True)
        return 1
    return result


def _supervise(children: list[Child], stopper: Stopper, up: UpConfig,
               args: argparse.Namespace) -> int:
    from clipsearch.health import health_status

    encoder, search = children
    deadline = time.monotonic() + up.wait
    while not stopper.event.is_set():
        ended = next((c for c in children if c.process.poll() is not None), None)
        if ended is not None:
            print(f"clipsearch up: the {ended.spec.name} service could not start: "
                  f"{ended.reason()}", file=sys.stderr, flush=True)
            return 1
        if health_status(search.spec.address, timeout_s=1.0) == "SERVING":
            print(f"clipsearch is up: search on {args.host}:{args.port}, encoder on "
                  f"{encoder.spec.address}, Milvus at {args.milvus}. Ctrl-C (or SIGTERM) "
                  f"stops both.", flush=True)
            break
        if time.monotonic() > deadline:
            print(f"clipsearch up: not ready after {up.wait:.0f} s (--wait)",
                  file=sys.stderr, flush=True)
            return 1
        stopper.event.wait(0.3)
    while not stopper.event.wait(0.5):
        if stopper.reload.is_set():
            stopper.reload.clear()
            for child in children:
                if child.spec.reloads_on_hup and child.process.poll() is None:
                    child.process.send_signal(signal.SIGHUP)
            print("clipsearch up: SIGHUP passed on to reload "
                  f"{', '.join(c.spec.name for c in children if c.spec.reloads_on_hup)}",
                  file=sys.stderr, flush=True)
        ended = next((c for c in children if c.process.poll() is not None), None)
        if ended is not None:
            print(f"clipsearch up: the {ended.spec.name} service ended: {ended.reason()}",
                  file=sys.stderr, flush=True)
            return 1
    return 0
