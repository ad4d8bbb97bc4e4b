"""Scoped tokens on a real encoder serving TLS (a process on loopback): each scope against
each RPC, limits for callers other than the search service, a renewed certificate served
after SIGHUP, and no token value in the log."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client.channel import TlsFiles
from clipsearch.access import METHOD_SCOPES
from tests.access_calls import (
    AUTH_CODES,
    ENCODER_SERVICE,
    ENCODER_TOKENS,
    assert_no_secret_in,
    call,
    method,
    token_file,
    wait_for_log,
)
from tests.certs import Certificates, make_certificates
from tests.servers import RunningService, running


@pytest.fixture(scope="module")
def access_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("access")


# ---- the encoder: scopes over TLS, certificate renewal ----------------------------------------


@pytest.fixture(scope="module")
def cert_sets(access_dir: Path) -> tuple[Certificates, Certificates]:
    return make_certificates(access_dir / "certs-a"), make_certificates(access_dir / "certs-b")


@pytest.fixture(scope="module")
def encoder(tiny_clip: Path, access_dir: Path,
            cert_sets: tuple[Certificates, Certificates]) -> Iterator[RunningService]:
    """An encoder with a token file, serving TLS from files that the test later renews;
    callers but the search service (`unlimited`) get 3 calls, then 1 a second."""
    first, _ = cert_sets
    cert, key = access_dir / "served.pem", access_dir / "served.key"
    shutil.copy(first.server_cert, cert)
    shutil.copy(first.server_key, key)
    tokens = token_file(access_dir / "encoder.tokens", ENCODER_TOKENS)
    with running(["serve", "encoder", "--model", str(tiny_clip), "--device", "cpu",
                  "--token-file", str(tokens), "--tls-cert", str(cert), "--tls-key", str(key),
                  "--rate-limit", "search=1/3", "--log-json"], access_dir / "encoder.log",
                 tls=TlsFiles(tls_ca=first.ca)) as service:
        yield service


def _tls_channel(address: str, ca: str) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(Path(ca).read_bytes())
    # A channel of its own (no shared subchannel): each check makes a new handshake.
    return grpc.secure_channel(address, credentials, [("grpc.use_local_subchannel_pool", 1)])


@pytest.mark.parametrize("name", ["search-svc", "indexer", "admin"])
def test_each_scope_against_each_encoder_rpc(encoder: RunningService, name: str,
                                             cert_sets: tuple[Certificates, Certificates]
                                             ) -> None:
    token, scopes = ENCODER_TOKENS[name]
    with _tls_channel(f"localhost:{encoder.port}", cert_sets[0].ca) as tls:
        for rpc in ENCODER_SERVICE.methods:
            needed = METHOD_SCOPES[f"/{ENCODER_SERVICE.full_name}/{rpc.name}"]
            outcome = call(tls, ENCODER_SERVICE, rpc, token)
            if needed in scopes.split()[0].split(","):
                assert outcome.code not in AUTH_CODES, (name, rpc.name, outcome)
            else:
                assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, (name, rpc.name)
        outcome = call(tls, ENCODER_SERVICE, method(ENCODER_SERVICE, "GetModelInfo"), None)
        assert outcome.code == grpc.StatusCode.UNAUTHENTICATED


def test_encoder_limits_other_callers_than_the_search_service(
        encoder: RunningService, cert_sets: tuple[Certificates, Certificates]) -> None:
    info = method(ENCODER_SERVICE, "GetModelInfo")
    with _tls_channel(f"localhost:{encoder.port}", cert_sets[0].ca) as tls:
        tool = [call(tls, ENCODER_SERVICE, info, ENCODER_TOKENS["tool"][0]).code
                for _ in range(8)]
        service = [call(tls, ENCODER_SERVICE, info, ENCODER_TOKENS["search-svc"][0]).code
                   for _ in range(8)]
    assert tool[:3] == [grpc.StatusCode.OK] * 3, tool
    assert tool.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 4, tool
    assert service == [grpc.StatusCode.OK] * 8, service


def _handshake_ok(address: str, ca: str) -> bool:
    with _tls_channel(address, ca) as tls:
        outcome = call(tls, ENCODER_SERVICE, method(ENCODER_SERVICE, "GetModelInfo"),
                       ENCODER_TOKENS["search-svc"][0], timeout_s=5)
    return outcome.code == grpc.StatusCode.OK


def test_sighup_serves_a_renewed_certificate(encoder: RunningService, access_dir: Path,
                                             cert_sets: tuple[Certificates, Certificates]
                                             ) -> None:
    first, renewed = cert_sets
    address = f"localhost:{encoder.port}"
    with _tls_channel(address, first.ca) as kept:  # a connection open across the renewal
        info = method(ENCODER_SERVICE, "GetModelInfo")
        assert call(kept, ENCODER_SERVICE, info, ENCODER_TOKENS["search-svc"][0]).code == \
            grpc.StatusCode.OK
        assert _handshake_ok(address, first.ca)
        assert not _handshake_ok(address, renewed.ca)
        reloaded = "reloaded: new connections use it"  # not the SIGHUP line before it
        reloads = encoder.log().count(reloaded)
        shutil.copy(renewed.server_cert, access_dir / "served.pem")
        shutil.copy(renewed.server_key, access_dir / "served.key")
        encoder.process.send_signal(signal.SIGHUP)
        wait_for_log(encoder, reloaded, reloads + 1)
        assert encoder.process.poll() is None, "SIGHUP stopped the encoder"
        assert _handshake_ok(address, renewed.ca)
        assert not _handshake_ok(address, first.ca)
        # The call on the connection opened before still works (no downtime for it).
        assert call(kept, ENCODER_SERVICE, info, ENCODER_TOKENS["search-svc"][0]).code == \
            grpc.StatusCode.OK


def test_no_token_value_in_the_log(encoder: RunningService) -> None:
    log = encoder.log()
    assert "PERMISSION_DENIED" in log  # the log saw the refusals
    assert_no_secret_in(log)
