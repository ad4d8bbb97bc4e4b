"""One configuration mechanism: the client commands and `clipsearch up` take their settings
through clipsearch/options.py (flag > environment variable > documented default), and `up`
builds its children's settings from the services' own config definitions."""

from __future__ import annotations

import dataclasses
import os

import pytest

from clipsearch.cli import build_parser
from clipsearch.client_config import ClientConfig
from clipsearch.commands_up import ENCODER_FLAGS, SEARCH_FLAGS, child_specs
from clipsearch.options import from_namespace
from encoder_service.config import EncoderConfig
from search_service.config import SearchConfig


def _service_config(argv: list[str], env: dict[str, str]) -> EncoderConfig | SearchConfig:
    """What a child started with `argv` and `env` would run with, parsed by the real CLI."""
    assert argv[1:4] == ["-m", "clipsearch.cli", "serve"], argv
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        args = build_parser().parse_args(argv[3:])
    if argv[4] == "encoder":
        return from_namespace(EncoderConfig, args)
    return from_namespace(SearchConfig, args)


@pytest.mark.parametrize("command", ["index", "search", "delete", "stats", "health"])
def test_client_commands_share_the_connection_options(
        command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLIPSEARCH_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("CLIPSEARCH_TIMEOUT", "7.5")
    monkeypatch.setenv("CLIPSEARCH_TLS_CERT", "/env/cert.pem")
    extra = ["folder"] if command == "index" else []
    args = build_parser().parse_args([command, *extra, "--token", "flag-token"])
    config = from_namespace(ClientConfig, args)
    assert config == ClientConfig(address="10.0.0.1:1234", token="flag-token", tls_ca="",
                                  tls_cert="/env/cert.pem", tls_key="", timeout=7.5)
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(ClientConfig):
        assert f"CLIPSEARCH_{field.name.upper()}" in help_text


def test_a_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CLIPSEARCH_TIMEOUT", "soon")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["stats"])
    assert "CLIPSEARCH_TIMEOUT='soon'" in capsys.readouterr().err


def test_up_forwards_the_services_own_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPSEARCH_ENCODER_MAX_DELAY_MS", "3.5")  # read by up, as by serve
    args = build_parser().parse_args([
        "up", "--model", "/m/tiny.pt", "--device", "cpu", "--precision", "fp32",
        "--max-batch", "8", "--no-download", "--encoder-port", "6001", "--encoder-token", "et",
        "--port", "6002", "--host", "0.0.0.0", "--milvus", "/d/x.db", "--token", "st",
        "--collection", "c1", "--log-json"])
    encoder_spec, search_spec = child_specs(args)
    for spec in (encoder_spec, search_spec):
        assert "et" not in spec.argv and "st" not in spec.argv, "tokens stay out of `ps`"
    encoder = _service_config(encoder_spec.argv, encoder_spec.env)
    search = _service_config(search_spec.argv, search_spec.env)
    assert isinstance(encoder, EncoderConfig) and isinstance(search, SearchConfig)
    assert (encoder.model, encoder.device, encoder.precision, encoder.max_batch,
            encoder.download, encoder.max_delay_ms, encoder.port, encoder.host,
            encoder.token, encoder.log_json) == (
        "/m/tiny.pt", "cpu", "fp32", 8, False, 3.5, 6001, "127.0.0.1", "et", True)
    assert (search.encoder, search.encoder_token, search.port, search.host, search.milvus,
            search.token, search.collection, search.log_json) == (
        "127.0.0.1:6001", "et", 6002, "0.0.0.0", "/d/x.db", "st", "c1", True)
    assert encoder_spec.address == "127.0.0.1:6001"
    assert search_spec.address == "127.0.0.1:6002"  # probed on loopback


def test_up_defaults_are_the_services_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CLIPSEARCH_"):
            monkeypatch.delenv(name)
    args = build_parser().parse_args(["up"])
    for config_cls, flags in ((EncoderConfig, ENCODER_FLAGS), (SearchConfig, SEARCH_FLAGS)):
        defaults = config_cls()
        for field, dest in flags.items():
            assert getattr(args, dest) == getattr(defaults, field), (config_cls, field)


def test_every_forwarded_setting_exists() -> None:
    for config_cls, flags in ((EncoderConfig, ENCODER_FLAGS), (SearchConfig, SEARCH_FLAGS)):
        names = {f.name for f in dataclasses.fields(config_cls)}
        assert set(flags) <= names, set(flags) - names
