"""`clipsearch token`: make tokens and the lines of a token file (clipsearch/access.py).

    clipsearch token new web --scopes search --out web.token >> tokens.txt
    printf '%s' "$TOKEN" | clipsearch token hash

`new` writes a fresh random token to `--out` (mode 0600: what a client's --token-file reads)
and prints the token file's line, which holds only the token's SHA-256. `hash` prints the
`sha256:<hex>` of a token read from standard input.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from typing import Any

from clipsearch.access import HASH_PREFIX, UNLIMITED, parse_scopes, parse_token_lines, token_digest


def _new(args: argparse.Namespace) -> int:
    try:
        scopes = parse_scopes(args.scopes)
    except ValueError as exc:
        print(f"error: --scopes: {exc}", file=sys.stderr)
        return 2
    token = secrets.token_urlsafe(32)
    line = f"{args.name}  {HASH_PREFIX}{token_digest(token).hex()}  {','.join(sorted(scopes))}"
    if args.unlimited:
        line += f"  {UNLIMITED}"
    try:
        parse_token_lines([line], "the new line")  # the name too must pass
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        print(f"error: cannot create {args.out}: {exc.strerror} (it must not exist yet)",
              file=sys.stderr)
        return 2
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    print(line)
    return 0


def _hash(args: argparse.Namespace) -> int:
    token = sys.stdin.readline().strip()
    if not token:
        print("error: no token on standard input", file=sys.stderr)
        return 2
    print(f"{HASH_PREFIX}{token_digest(token).hex()}")
    return 0


def add_commands(commands: Any) -> None:
    """Adds `token new` and `token hash` to the `clipsearch` command's subparsers."""
    token = commands.add_parser("token", help="make tokens and token file lines").add_subparsers(
        dest="token_command", required=True)
    new = token.add_parser("new", help="a new random token (written to --out) and its token "
                                       "file line (printed)")
    new.add_argument("name", help="the token's name, as logs, metrics and limits show it")
    new.add_argument("--scopes", required=True, help="comma list of search, index, admin, "
                                                     "or all")
    new.add_argument("--out", required=True, help="file to write the token to (mode 0600; "
                                                  "must not exist)")
    new.add_argument("--unlimited", action="store_true",
                     help="exempt from rate and concurrency limits (a service's own token)")
    new.set_defaults(handler=_new)
    hashed = token.add_parser("hash", help="sha256:<hex> of a token read from standard input")
    hashed.set_defaults(handler=_hash)
