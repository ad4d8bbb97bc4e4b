"""How the client commands (index, search, delete, stats, health) reach a service: the same
options mechanism as the services (clipsearch/options.py), with CLIPSEARCH_* variables."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from clipsearch.options import add_options, from_namespace, option

ENV_PREFIX = "CLIPSEARCH_"
DEFAULT_ADDRESS = "127.0.0.1:50052"


@dataclass
class ClientConfig:
    """Where the service is and how to talk to it."""

    address: str = option("the service's host:port (the search service; for health, any)",
                          default=DEFAULT_ADDRESS)
    token: str = option("bearer token sent with every call", default="")
    token_file: str = option("file holding the bearer token (its first non-blank line), "
                             "instead of --token", default="")
    tls_ca: str = option("PEM CA bundle to verify the service: use TLS", default="")
    tls_cert: str = option("PEM client certificate, for a service that requires mTLS",
                           default="")
    tls_key: str = option("PEM private key for --tls-cert", default="")
    timeout: float = option("deadline of each call, seconds", default=60.0)


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """--address, --token/--token-file, --tls-ca/-cert/-key and --timeout, each with its
    variable."""
    add_options(parser, ClientConfig, ENV_PREFIX)


def client_config(args: argparse.Namespace) -> ClientConfig:
    """The ClientConfig a command was given."""
    return from_namespace(ClientConfig, args)


def bearer_token(args: argparse.Namespace) -> str:
    """The token to send: --token, or the first non-blank line of --token-file ("" when
    neither). Both at once is an error: which one was meant is not clear."""
    token, path = getattr(args, "token", ""), getattr(args, "token_file", "")
    if token and path:
        raise SystemExit("error: give --token or --token-file (or CLIPSEARCH_TOKEN or "
                         "CLIPSEARCH_TOKEN_FILE), not both")
    if not path:
        return str(token)
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise SystemExit(f"error: cannot read the token file {path}: {exc.strerror}") from None
    token = next((line.strip() for line in lines if line.strip()), "")
    if not token:
        raise SystemExit(f"error: the token file {path} is empty")
    return token
