"""A local HTTP server on loopback that serves a checkpoint the way OpenAI's URLs do
(`/<sha256>/<file>`), and can misbehave on purpose: cut the body short, serve other bytes,
stall, or trickle slowly."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MODES = ("ok", "slow", "truncate", "wrong", "stall")


@dataclass
class WeightsServer:
    """What the server serves and how; `modes` is consumed one per request (the last one
    stays), `requests` lists the paths asked for."""

    body: bytes
    name: str = "ViT-B-32.pt"
    modes: list[str] = field(default_factory=lambda: ["ok"])
    requests: list[str] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)
    port: int = 0

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    @property
    def base(self) -> str:
        """The mirror base URL: files are at `<base>/<sha256>/<name>`."""
        return f"http://127.0.0.1:{self.port}/clip/models"

    @property
    def url(self) -> str:
        return f"{self.base}/{self.sha256}/{self.name}"

    def next_mode(self) -> str:
        return self.modes.pop(0) if len(self.modes) > 1 else self.modes[0]

    def downloads(self) -> int:
        return sum(path.endswith(f"/{self.name}") for path in self.requests)


def _handler(state: WeightsServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            state.requests.append(self.path)
            # Any <sha256>/<name>: checking the hash is the downloader's job (and an
            # encoder asking for OpenAI's ViT-B/32 can be held stalled here).
            if not (self.path.startswith("/clip/models/")
                    and self.path.endswith(f"/{state.name}")):
                self.send_error(404)
                return
            mode = state.next_mode()
            body = state.body
            if mode == "wrong":
                body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            half = len(body) // 2
            if mode == "truncate":
                self.wfile.write(body[:half])
                self.wfile.flush()
                self.close_connection = True
                return
            if mode == "stall":
                self.wfile.write(body[:half])
                self.wfile.flush()
                state.released.wait(60)
                return
            step = 1 << 16
            for start in range(0, len(body), step):
                self.wfile.write(body[start:start + step])
                if mode == "slow":
                    self.wfile.flush()
                    time.sleep(0.01)

    return Handler


@contextmanager
def serving(state: WeightsServer) -> Iterator[WeightsServer]:
    """Runs the server on 127.0.0.1 (a free port) in a thread for the block."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.released.set()
        server.shutdown()
        server.server_close()


def save_small_clip(out: Path) -> Path:
    """A CLIP of the tiny test architecture with random weights (~7 MB, built in a second):
    a real checkpoint that the encoder loads, small enough to serve many times."""
    import torch

    from encoder_service.model import CLIP
    from encoder_service.testmodels import TINY_CLIP, _seeded, _state_dict

    with _seeded(0):
        state_dict = _state_dict(CLIP(**TINY_CLIP))  # type: ignore[arg-type]
    torch.save(state_dict, out)
    return out
