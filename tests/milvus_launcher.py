"""A real Milvus server on this machine for tests and benchmarks: the PyPI package
`milvus` (embedded standalone), started without Docker.

`milvus` 2.3.5 ships the `milvus run standalone` binary (embedded etcd, local storage,
rocksmq) as .lzma files; it runs here without Docker. This module starts that binary
directly, without the package's `MilvusServer` wrapper, because the tests need things the
wrapper does not do:

* its own process group, stopped by SIGKILL of the group (SIGTERM does not stop it);
* a fresh base directory (config, logs, data) per start, and every port explicit and free:
  the wrapper takes fixed defaults (19530, 9091, 53100...) where free, and the embedded
  etcd always binds 2379/2380 unless given an etcd config, so two servers on one machine
  (two test sessions) would collide;
* every component's `ip` set to 127.0.0.1, otherwise they advertise (and dial) the
  machine's first non-loopback address. The gRPC ports still *listen* on all interfaces
  (Milvus 2.3 has no listen-address setting); etcd and what is dialled are loopback only.

Measured here (2 CPUs): the first start unpacks the binaries (~250 MB) into the cache,
4-7 s, once; then 1.3-1.8 s from exec to ready on a fresh data dir (~2.6 s with writing
the config). A restart on the same data dir waits for the killed server's etcd leases to
expire (`common.session.ttl`: ~1 min with Milvus's 30 s; ~7 s with the 10 s set here).
Idle, the server uses ~2% of a core and ~235 MB RSS; a fresh data dir takes ~270 MB.
Loading a collection takes 2-3 s (queryCoord's observers), searching with Strong
consistency waits for a time tick (~200 ms per call; a search with output fields makes
two). The binary also writes /run/milvus/standalone.pid and /tmp/milvus/server_id_<pid>
(fixed paths, not configurable); stop() removes the latter.

The pytest fixtures are in tests/milvus_server.py.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import lzma
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = [
    "MILVUS_PACKAGE_VERSION",
    "SKIP_ENV",
    "MilvusServerError",
    "MilvusServerProcess",
    "milvus_server_available",
    "start_milvus_server",
]

MILVUS_PACKAGE_VERSION = "2.3.5"  # the PyPI `milvus` package (dev extra), Milvus v2.3.5
SKIP_ENV = "CLIPSEARCH_TEST_MILVUS_SERVER"  # "0": skip the tests that need the server
CACHE_ENV = "CLIPSEARCH_MILVUS_SERVER_CACHE"  # where the unpacked binaries are kept
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache"  # the repo's, git-ignored

_COMPONENTS = ("rootCoord", "queryCoord", "proxy", "queryNode", "indexNode", "dataCoord",
               "dataNode")
# milvus.yaml values that differ from the package's template, for tests. A restart on the
# same data dir waits for the killed server's etcd session leases to expire (`ttl`, 30 s by
# default: ~1 min restarts; ~7 s with 10). Loading a collection takes 2-3 s whatever the
# queryCoord intervals (tried: no gain worth leaving the defaults for).
TEST_CONFIG: dict[str, object] = {
    "common.session.ttl": 10,
    "log.level": "warn",
}
# Environment variables passed to the server; Milvus reads any other variable named like a
# config key (PROXY_PORT, ETCD_ENDPOINTS...) as an override, so nothing else is inherited.
_KEPT_ENV = ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "TZ")
_STARTED: set[MilvusServerProcess] = set()


class MilvusServerError(RuntimeError):
    """The Milvus server could not be started (or stopped)."""


def milvus_server_available() -> str | None:
    """None when a Milvus server can be started here, else why not."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return (f"the `milvus` {MILVUS_PACKAGE_VERSION} package runs on x86-64 Linux only "
                f"(this is {sys.platform}/{platform.machine()})")
    try:
        version = importlib.metadata.version("milvus")
    except importlib.metadata.PackageNotFoundError:
        return (f"the PyPI package `milvus=={MILVUS_PACKAGE_VERSION}` is not installed "
                "(it is in the `dev` extra: pip install -e '.[dev]')")
    if version != MILVUS_PACKAGE_VERSION:
        return (f"`milvus` {version} is installed; the tests are written for "
                f"{MILVUS_PACKAGE_VERSION}")
    try:
        _package_dir()
    except (ImportError, FileNotFoundError) as e:
        return f"the `milvus` package is broken: {e}"
    return None


def _package_dir() -> Path:
    import milvus

    data = Path(milvus.__file__).resolve().parent / "data"
    if not all((data / f).is_file() for f in ("bin/milvus.lzma", "config.yaml.template")):
        raise FileNotFoundError(f"no milvus.lzma or config template under {data}")
    return data


def _binaries(cache_dir: Path | None = None) -> Path:
    """The unpacked server binary and its libraries, unpacked once per cache (atomically)."""
    cache = Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)
    target = cache / f"milvus-server-{MILVUS_PACKAGE_VERSION}"
    if (target / "milvus").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    try:
        for packed in sorted((_package_dir() / "bin").glob("*.lzma")):
            unpacked = scratch / packed.name.removesuffix(".lzma")
            with lzma.open(packed) as src, unpacked.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            unpacked.chmod(0o755)
        try:
            scratch.rename(target)  # another session may have won the race: use theirs
        except OSError:
            if not (target / "milvus").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):  # all held open at once, so they are distinct
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _write_config(base_dir: Path, proxy_port: int | None,
                  extra: dict[str, object]) -> dict[str, int]:
    """Renders configs/milvus.yaml and configs/embedEtcd.yaml; returns the ports used."""
    from milvus import MilvusServerConfig

    config = MilvusServerConfig(data_dir=str(base_dir))
    port_keys = sorted(k for k in config.configurable_items if k.endswith("_port"))
    free = iter(_free_ports(len(port_keys) + 3))
    ports = {k: next(free) for k in port_keys}
    if proxy_port:
        ports["proxy_port"] = proxy_port
    ports["metrics_port"], ports["etcd_client_port"], ports["etcd_peer_port"] = (
        next(free), next(free), next(free))
    config.update(**{k: ports[k] for k in port_keys})  # explicit: bind-checked, no scanning
    for component in _COMPONENTS:
        config.set(f"{component}.ip", "127.0.0.1")
    for key, value in {**TEST_CONFIG, **extra}.items():
        config.set(key, value)  # replaces `key: ...` lines of the template (no new keys)
    try:
        config.resolve()  # writes base_dir/configs/milvus.yaml; raises if a port is taken
    except RuntimeError as e:
        raise MilvusServerError(f"cannot configure the Milvus server: {e}") from e
    etcd = (
        "name: clipsearch-test\n"
        f"listen-client-urls: http://127.0.0.1:{ports['etcd_client_port']}\n"
        f"advertise-client-urls: http://127.0.0.1:{ports['etcd_client_port']}\n"
        f"listen-peer-urls: http://127.0.0.1:{ports['etcd_peer_port']}\n"
        f"initial-advertise-peer-urls: http://127.0.0.1:{ports['etcd_peer_port']}\n"
        f"initial-cluster: clipsearch-test=http://127.0.0.1:{ports['etcd_peer_port']}\n"
    )
    (base_dir / "configs" / "embedEtcd.yaml").write_text(etcd)
    return ports


class MilvusServerProcess:
    """A running `milvus run standalone` in its own process group."""

    def __init__(self, base_dir: Path, binaries: Path, ports: dict[str, int]) -> None:
        self.base_dir = base_dir
        self.binaries = binaries
        self.ports = ports
        self.port = ports["proxy_port"]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.health_url = f"http://127.0.0.1:{ports['metrics_port']}/healthz"
        self.log_path = base_dir / "logs" / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.start_s = 0.0  # seconds the last start took, exec to ready

    def __repr__(self) -> str:
        return f"MilvusServerProcess({self.uri}, pid={self.pid}, base_dir={self.base_dir})"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _spawn(self) -> None:
        env = {k: os.environ[k] for k in _KEPT_ENV if k in os.environ}
        env.update(
            DEPLOY_MODE="STANDALONE",
            METRICS_PORT=str(self.ports["metrics_port"]),
            MILVUSCONF=str(self.base_dir / "configs"),
            ETCD_CONFIG_PATH=str(self.base_dir / "configs" / "embedEtcd.yaml"),
            LD_LIBRARY_PATH=str(self.binaries),
        )
        command = [str(self.binaries / "milvus"), "run", "standalone"]
        setpriv = shutil.which("setpriv")
        # Dies with the test process even when that is SIGKILLed. The signal fires when
        # the spawning *thread* ends, so only from the main thread (pytest's fixtures).
        if setpriv and threading.current_thread() is threading.main_thread():
            command = [setpriv, "--pdeathsig", "KILL", "--", *command]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.base_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        _STARTED.add(self)

    def _wait_ready(self, timeout_s: float) -> None:
        """Until /healthz says OK and a client can list collections."""
        from pymilvus import MilvusClient

        started = time.monotonic()
        deadline = started + timeout_s
        healthy = False
        last_error = ""
        while time.monotonic() < deadline:
            if not self.alive:
                code = self.process.returncode if self.process else None
                raise MilvusServerError(
                    f"the Milvus server exited with {code} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if not healthy:
                    with urllib.request.urlopen(self.health_url, timeout=2) as response:
                        healthy = b"OK" in response.read()
                if healthy:
                    client = MilvusClient(self.uri, timeout=5)
                    try:
                        client.list_collections(timeout=5)
                    finally:
                        client.close()
                    self.start_s = time.monotonic() - started
                    return
            except (OSError, urllib.error.URLError) as e:
                last_error = str(e)
            except Exception as e:  # pymilvus: not ready yet
                last_error = f"{type(e).__name__}: {e}"
            time.sleep(0.2)
        self.stop()
        raise MilvusServerError(
            f"the Milvus server at {self.uri} was not ready after {timeout_s:.0f} s "
            f"(last error: {last_error}); log {self.log_path}:\n{self.log_tail()}")

    def start(self, timeout_s: float = 120) -> None:
        if self.alive:
            raise MilvusServerError(f"{self!r} is already running")
        self._spawn()
        self._wait_ready(timeout_s)

    def stop(self) -> None:
        """SIGKILL the whole process group (SIGTERM does not stop it) and reap it."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired as e:  # pragma: no cover - SIGKILL is not refused
            raise MilvusServerError(f"{self!r} did not die after SIGKILL") from e
        _STARTED.discard(self)
        with contextlib.suppress(OSError):  # a killed server leaves its id file behind
            os.remove(f"/tmp/milvus/server_id_{process.pid}")

    def restart(self, timeout_s: float = 180) -> None:
        """Kill and start again on the same data dir and ports (data survives)."""
        self.stop()
        self.start(timeout_s)

    def __enter__(self) -> MilvusServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_milvus_server(base_dir: Path, port: int | None = None, timeout_s: float = 120,
                        extra_config: dict[str, object] | None = None) -> MilvusServerProcess:
    """A fresh Milvus server with its config, logs and data under `base_dir`, ready to use.

    `port` is the client (proxy) port, free by default; all other ports are free ones too.
    `extra_config` overrides milvus.yaml keys present in the package's template
    (`{"queryCoord.checkInterval": 500}`); keys the template lacks are ignored.
    """
    reason = milvus_server_available()
    if reason:
        raise MilvusServerError(reason)
    try:
        binaries = _binaries()
    except OSError as e:
        raise MilvusServerError(f"cannot unpack the Milvus server binaries: {e}") from e
    attempts = 1 if port else 3  # a free port can be taken between our check and its bind
    for attempt in range(1, attempts + 1):
        base = Path(base_dir)
        if base.exists() and any(base.iterdir()):
            raise MilvusServerError(f"{base} is not empty: a fresh server needs a fresh dir")
        base.mkdir(parents=True, exist_ok=True)
        server = MilvusServerProcess(base, binaries, _write_config(base, port, extra_config or {}))
        try:
            server.start(timeout_s)
            return server
        except MilvusServerError as e:
            server.stop()
            if attempt == attempts or "address already in use" not in str(e):
                raise
            shutil.rmtree(base)
    raise AssertionError("unreachable")  # pragma: no cover


@atexit.register
def _stop_all() -> None:
    for server in list(_STARTED):
        with contextlib.suppress(Exception):
            server.stop()
