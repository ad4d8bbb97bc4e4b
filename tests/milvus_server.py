"""Pytest fixtures for a real Milvus server (tests/milvus_launcher.py starts it).

The `milvus_server` fixture (session scope) yields the server's URI; it fails the tests
that use it when the server cannot start, unless CLIPSEARCH_TEST_MILVUS_SERVER=0, which
skips them. Registered through `pytest_plugins = ["tests.milvus_server"]`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from search_service.store import VectorStore
from tests.milvus_launcher import (
    SKIP_ENV,
    MilvusServerError,
    MilvusServerProcess,
    milvus_server_available,
    start_milvus_server,
)

__all__ = ["milvus_server", "milvus_server_process", "start_milvus_server", "store_on"]


# ---- pytest ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def milvus_server_process(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MilvusServerProcess]:
    """One Milvus server for the test session, on a fresh data dir; killed at the end.

    Tests must not leave state behind: use a unique collection name and drop it.
    """
    if os.environ.get(SKIP_ENV, "1").strip() == "0":
        pytest.skip(f"Milvus server tests disabled by {SKIP_ENV}=0")
    reason = milvus_server_available()
    if reason:
        pytest.fail(f"cannot run the Milvus server tests: {reason} "
                    f"(set {SKIP_ENV}=0 to skip them)", pytrace=False)
    base = tmp_path_factory.mktemp("milvus-server")
    try:
        server = start_milvus_server(base)
    except MilvusServerError as e:
        error = str(e)
    else:
        error = ""
    if error:  # failed outside the except block: no chained traceback in the report
        pytest.fail(f"cannot start the Milvus server for the tests: {error}\n"
                    f"(set {SKIP_ENV}=0 to skip the tests that need it)", pytrace=False)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base / "data", ignore_errors=True)  # ~270 MB; the logs are kept


@pytest.fixture(scope="session")
def milvus_server(milvus_server_process: MilvusServerProcess) -> str:
    """The URI (http://127.0.0.1:PORT) of the session's Milvus server."""
    return milvus_server_process.uri


# ---- a store on either backend ----------------------------------------------------------------


def store_on(request: pytest.FixtureRequest, tmp_path: Path, dimension: int,
             prefix: str) -> Iterator[VectorStore]:
    """A fresh VectorStore on the backend `request.param` names ("lite": a file under
    `tmp_path`; "server": a new collection in the session's server, dropped afterwards)."""
    uri = (str(tmp_path / "milvus.db") if request.param == "lite"
           else str(request.getfixturevalue("milvus_server")))
    opened = VectorStore(uri, collection=f"{prefix}_{uuid.uuid4().hex[:12]}",
                         dimension=dimension, model="m", model_fingerprint="sha256:m")
    yield opened
    if request.param == "server":
        opened._client.drop_collection(opened.collection)
    opened.close()
