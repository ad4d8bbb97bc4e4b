"""Named CLIP weights on disk, downloaded so that a failed, interrupted or concurrent
download heals instead of leaving a broken file behind.

OpenAI publishes each checkpoint at `.../clip/models/<sha256>/<file>.pt`: the path carries
the file's SHA-256. A download goes to a temporary file in the weights folder, is checked
against that hash and only then renamed onto the final name (atomic on one file system),
so the final name never holds a partial file. A file already there is checked against the
hash too (the result is remembered in `<file>.sha256` beside it, keyed by size and
modification time, so a restart does not hash 340 MB again); a damaged one is downloaded
again when downloads are allowed. Replicas that share the folder (a volume under
`docker compose up --scale encoder=3`) take an exclusive lock on `.<file>.lock` first,
so one downloads and the others wait and then find the checked file.

Two encoder options tune it (encoder_service/config.py; flag and environment variable):

* `--weights-mirror` (`CLIPSEARCH_ENCODER_WEIGHTS_MIRROR`): a base URL serving the same
  layout as OpenAI's, `<mirror>/<sha256>/<file>.pt` (an internal HTTP server or object
  store holding copies). The hash is still checked, so a mirror cannot hand out other
  weights.
* `--download-timeout-s` (`CLIPSEARCH_ENCODER_DOWNLOAD_TIMEOUT_S`, default 60): how long
  connecting, or any single read, may wait for data before the download fails as stalled.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from clipsearch.options import env_name, flag_name
from encoder_service.config import ENV_PREFIX, EncoderConfig

log = logging.getLogger("clipsearch.encoder.weights")

# The options themselves are EncoderConfig's; their names and default are read from it.
MIRROR_ENV = env_name(ENV_PREFIX, "weights_mirror")
TIMEOUT_ENV = env_name(ENV_PREFIX, "download_timeout_s")
TIMEOUT_OPTION = f"{flag_name('download_timeout_s')} / {TIMEOUT_ENV}"
DEFAULT_TIMEOUT_S: float = EncoderConfig.download_timeout_s
PROGRESS_INTERVAL_S = 5.0
CHUNK_BYTES = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class WeightsError(RuntimeError):
    """The weights could not be made available; the message says why."""


def expected_sha256(url: str) -> str | None:
    """The SHA-256 carried by an OpenAI-style URL (the path segment before the file
    name), or None when the URL carries none."""
    parts = urlsplit(url).path.rstrip("/").split("/")
    if len(parts) >= 2 and _SHA256.match(parts[-2].lower()):
        return parts[-2].lower()
    return None


def source_url(url: str, mirror: str = "") -> str:
    """Where to download `url` from: itself, or the same `<sha256>/<file>` on `mirror`."""
    if not mirror:
        return url
    name = os.path.basename(urlsplit(url).path)
    digest = expected_sha256(url)
    return "/".join([mirror.rstrip("/"), *([digest] if digest else []), name])


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size} {stat.st_mtime_ns}"


def cached_sha256(path: Path) -> str:
    """`file_sha256(path)`, remembered in `<file>.sha256` beside it for as long as the
    file's size and modification time stay the same (not written where the folder is
    read-only)."""
    cache = _cache_path(path)
    stamp = _stamp(path)
    with contextlib.suppress(OSError, ValueError):
        digest, cached_stamp = cache.read_text().strip().split(" ", 1)
        if cached_stamp == stamp and _SHA256.match(digest):
            return digest
    digest = file_sha256(path)
    _remember(path, digest, stamp)
    return digest


def _remember(path: Path, digest: str, stamp: str) -> None:
    with contextlib.suppress(OSError):
        _cache_path(path).write_text(f"{digest} {stamp}\n")


def ensure_weights(url: str, folder: str | Path, *, download: bool = True,
                   mirror: str = "", timeout_s: float = DEFAULT_TIMEOUT_S,
                   progress_interval_s: float = PROGRESS_INTERVAL_S) -> Path:
    """The path of the checked weights file for `url` in `folder`, downloaded when missing
    or damaged and `download` is true, from `mirror` when one is given (the encoder's
    options above). Raises WeightsError saying why when there is no usable
    file. With downloads off, a file whose hash differs is used as it is, with a warning
    (it may be the operator's own copy)."""
    folder = Path(folder).expanduser()
    path = folder / os.path.basename(urlsplit(url).path)
    expected = expected_sha256(url)
    if path.is_file():
        actual = cached_sha256(path) if expected else None
        if actual == expected:
            return path
        if not download:
            log.warning("%s has sha256 %s, not the published %s; downloads are off, so it "
                        "is used as it is", path, actual, expected)
            return path
        log.warning("%s is damaged or incomplete (%d bytes, sha256 %s, expected %s): "
                    "downloading it again", path, path.stat().st_size, actual, expected)
    elif not download:
        raise WeightsError("downloads are off")
    if not timeout_s > 0:
        raise WeightsError(f"a download timeout of {timeout_s:g} s ({TIMEOUT_OPTION}) "
                           f"cannot work: it must be over 0")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(folder / f".{path.name}.lock", path):
            if path.is_file() and (expected is None or cached_sha256(path) == expected):
                log.info("%s was downloaded by another process meanwhile", path)
                return path
            _remove_partial_downloads(path)
            _download(source_url(url, mirror), path, expected, timeout_s, progress_interval_s)
    except OSError as exc:
        raise WeightsError(f"cannot write to {folder}: {exc}") from exc
    return path


@contextlib.contextmanager
def _exclusive(lock_path: Path, path: Path) -> Iterator[None]:
    """An exclusive flock on `lock_path`, shared by every process using the folder."""
    with lock_path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            log.info("another process is downloading %s; waiting for it", path.name)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_partial_downloads(path: Path) -> None:
    """Temporary files of downloads that died (killed, or the container removed); only
    called under the lock, so none of them is being written."""
    for stale in path.parent.glob(f".{path.name}.*.part"):
        with contextlib.suppress(OSError):
            stale.unlink()
            log.info("removed the partial download %s", stale.name)


class _Progress:
    """Logs bytes and percent at most every `interval_s` seconds, and at the end."""

    def __init__(self, url: str, total: int | None, interval_s: float) -> None:
        self.url, self.total, self.interval_s = url, total, interval_s
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            self.log(done, "downloading")

    def log(self, done: int, what: str) -> None:
        seconds = max(time.monotonic() - self.start, 1e-9)
        if self.total:
            log.info("%s %s: %d of %d bytes (%.0f%%), %.1f MB/s", what, self.url, done,
                     self.total, 100 * done / self.total, done / seconds / 1e6)
        else:
            log.info("%s %s: %d bytes, %.1f MB/s", what, self.url, done, done / seconds / 1e6)


def _download(url: str, path: Path, expected: str | None, timeout_s: float,
              progress_interval_s: float) -> None:
    """Downloads `url` to a temporary file beside `path`, checks its length and hash,
    then renames it onto `path`. Raises WeightsError; leaves no temporary file."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",
                                     suffix=".part", delete=False) as part:
        part_path = Path(part.name)
        try:
            digest = _fetch_into(url, part, timeout_s, progress_interval_s)
            part.flush()
            os.fsync(part.fileno())
        except BaseException:
            part_path.unlink(missing_ok=True)
            raise
    if expected and digest != expected:
        size = part_path.stat().st_size
        part_path.unlink(missing_ok=True)
        raise WeightsError(f"the download of {url} ({size} bytes) has sha256 {digest}, "
                           f"not the {expected} its URL names: a damaged transfer or a "
                           f"wrong file; nothing was kept")
    os.chmod(part_path, 0o644)  # mkstemp makes it private; weights are for any user to read
    stamp = _stamp(part_path)
    os.replace(part_path, path)
    with contextlib.suppress(OSError):  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    _remember(path, digest, stamp)


def _fetch_into(url: str, out: IO[bytes], timeout_s: float, progress_interval_s: float) -> str:
    """Streams `url` into `out`; returns the SHA-256 of what was written."""
    request = urllib.request.Request(url, headers={"User-Agent": "clipsearch"})
    digest = hashlib.sha256()
    done = 0
    total: int | None = None
    try:
        # The timeout bounds connecting and each read on the socket: a stalled server ends
        # the download instead of holding the encoder in "loading" for ever.
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            progress = _Progress(url, total, progress_interval_s)
            progress.log(0, "downloading")
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                progress.update(done)
    except TimeoutError as exc:
        raise WeightsError(f"the download of {url} stalled: no data for {timeout_s:g} s "
                           f"after {done} of {total or '?'} bytes "
                           f"({TIMEOUT_OPTION} sets the limit)") from exc
    except urllib.error.HTTPError as exc:
        raise WeightsError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise WeightsError(f"cannot reach {url}: {exc.reason}") from exc
    except (http.client.HTTPException, ConnectionError) as exc:
        raise WeightsError(f"the download of {url} broke off after {done} of "
                           f"{total or '?'} bytes: {exc!r}") from exc
    if total is not None and done != total:
        raise WeightsError(f"the download of {url} broke off after {done} of {total} bytes")
    progress.log(done, "downloaded")
    return digest.hexdigest()
