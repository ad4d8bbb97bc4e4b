"""Who may call: bearer tokens on every RPC but health, TLS, and mTLS from search to encoder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from client import EncoderClient, SearchClient, Unauthenticated, Unavailable
from client.channel import TlsFiles
from tests.certs import Certificates, make_certificates
from tests.servers import RunningService, health_status, running

ENCODER_TOKEN = "encoder-secret-1"
SEARCH_TOKEN = "search-secret-2"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def secured(tiny_clip: Path, certs: Certificates, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[RunningService, RunningService]]:
    """An encoder needing a token and client certificates (mTLS), and a search service
    needing its own token over TLS, calling the encoder with its token and certificate."""
    logs = tmp_path_factory.mktemp("secured")
    mtls = TlsFiles(tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key)
    with running(["serve", "encoder", "--model", str(tiny_clip), "--token", ENCODER_TOKEN,
                  "--tls-cert", certs.server_cert, "--tls-key", certs.server_key,
                  "--tls-ca", certs.ca], logs / "encoder.log", tls=mtls) as encoder, \
        running(["serve", "search", "--encoder", f"localhost:{encoder.port}",
                 "--encoder-token", ENCODER_TOKEN, "--encoder-tls-ca", certs.ca,
                 "--encoder-tls-cert", certs.client_cert, "--encoder-tls-key", certs.client_key,
                 "--milvus", str(logs / "milvus.db"), "--token", SEARCH_TOKEN,
                 "--tls-cert", certs.server_cert, "--tls-key", certs.server_key],
                logs / "search.log", tls=TlsFiles(tls_ca=certs.ca)) as search:
        yield encoder, search


def test_encoder_needs_token_and_client_certificate(secured: tuple[RunningService, RunningService],
                                                    certs: Certificates) -> None:
    encoder, _ = secured
    mtls = TlsFiles(tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key)
    with EncoderClient(encoder.address, token=ENCODER_TOKEN, **mtls) as client:
        assert client.encode_texts(["a red circle"]).shape[0] == 1
    for token in ("", "wrong", ENCODER_TOKEN + "x"):
        with pytest.raises(Unauthenticated, match="Bearer"), \
                EncoderClient(encoder.address, token=token, **mtls) as client:
            client.encode_texts(["a red circle"])
    # Health needs no token, but still the TLS handshake.
    assert health_status(encoder.address, **mtls) == "SERVING"
    assert health_status(encoder.address) == "DOWN"  # plaintext is refused
    with pytest.raises(Unavailable), EncoderClient(encoder.address, token=ENCODER_TOKEN,
                                                   tls_ca=certs.ca, timeout_s=5) as client:
        client.encode_texts(["no client certificate"])


def test_search_needs_its_token_and_reaches_encoder_over_mtls(
        secured: tuple[RunningService, RunningService], certs: Certificates,
        tmp_path: Path) -> None:
    _, search = secured
    from PIL import Image

    picture = tmp_path / "red.png"
    Image.new("RGB", (40, 40), "red").save(picture)
    with SearchClient(search.address, token=SEARCH_TOKEN, tls_ca=certs.ca) as client:
        summary = client.index_files([picture])
        assert summary.added == 1, summary.failures
        assert client.search_text("a red square", top_k=1)[0].uri == str(picture)
    with pytest.raises(Unauthenticated), SearchClient(search.address, token=ENCODER_TOKEN,
                                                      tls_ca=certs.ca) as client:
        client.stats()
    with pytest.raises(Unauthenticated), SearchClient(search.address, tls_ca=certs.ca) as client:
        client.index_files([picture])
