"""A service started by `clipsearch up` ends with it, however `up` ends.

`up` starts each service with two environment variables: its own pid, and the number
of an inherited file descriptor, the read end of a pipe whose write end only `up` holds.

* `follow_parent()`, first thing in the service process, asks Linux to send it SIGTERM
  when its parent dies (prctl PR_SET_PDEATHSIG), and checks the parent has not died
  already, before the request took effect.
* `watch_parent(loop, stop)`, once the service's event loop runs, calls `stop` when the
  pipe reaches end-of-file: the kernel closes the write end when `up` exits, even by
  SIGKILL. This works where there is no prctl (macOS) too.

Either way the service then stops as on SIGTERM: health NOT_SERVING, in-flight calls
drain, exit. Both variables are removed from the environment once read, so that
processes the service starts do not inherit them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

PARENT_PID_ENV = "CLIPSEARCH_PARENT_PID"
WATCH_FD_ENV = "CLIPSEARCH_PARENT_WATCH_FD"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_watch_fd: int | None = None
T = TypeVar("T")


def child_environment(watch_fd: int) -> dict[str, str]:
    """What `up` adds to a child's environment (the child inherits `watch_fd`)."""
    return {PARENT_PID_ENV: str(os.getpid()), WATCH_FD_ENV: str(watch_fd)}


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Asks the kernel to send `sig` to this process when its parent dies (Linux only);
    False where that cannot be done."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def follow_parent() -> None:
    """In a process started by `clipsearch up`: end (SIGTERM) when `up` ends. Does
    nothing in a process started otherwise."""
    global _watch_fd
    parent = os.environ.pop(PARENT_PID_ENV, "")
    fd = os.environ.pop(WATCH_FD_ENV, "")
    if fd.isdigit():
        _watch_fd = int(fd)
    if not parent.isdigit():
        return
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != int(parent):  # `up` died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def watch_parent(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    """Calls `stop` once the parent's watch pipe closes (no-op without one)."""
    fd = _watch_fd
    if fd is None:
        return

    def readable() -> None:
        try:
            data = os.read(fd, 512)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # end of file: the parent is gone
            loop.remove_reader(fd)
            stop()

    try:
        os.set_blocking(fd, False)
        loop.add_reader(fd, readable)
    except (OSError, ValueError, NotImplementedError):
        with contextlib.suppress(OSError):
            os.close(fd)


def in_daemon_thread(work: Callable[[], T]) -> asyncio.Future[T]:
    """Runs `work` on a daemon thread of its own; its result or error comes back through
    the returned future of the running loop.

    For startup work that cannot be interrupted (a model load blocked on a stalled
    download): a ThreadPoolExecutor's threads are joined at interpreter exit, so a
    SIGTERM during such a load used to keep the process alive until the download timed
    out; a daemon thread is not waited for, and the process ends once it has stopped."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled: nobody waits for it any more
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = work()
        except BaseException as error:  # handed to the awaiting coroutine
            with contextlib.suppress(RuntimeError):  # the loop closed: the process is ending
                loop.call_soon_threadsafe(settle, None, error)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="load", daemon=True).start()
    return future
