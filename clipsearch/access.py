"""Who may call what: named tokens with scopes, read from a token file, reloaded on SIGHUP.

Scopes (`METHOD_SCOPES` maps every RPC of both services to one, declared here only):

* `search`: every read RPC (SearchText, SearchImage, SearchSimilar, SearchCombined, Get,
  Stats; the encoder's EncodeText, EncodeImage, GetModelInfo);
* `index`: Index;
* `admin`: Delete, FindDuplicates (a scan of the whole collection) and anything that changes
  or drops data. A method missing from the map needs `admin` (fail closed).

The token file has one token per line, `NAME  TOKEN  SCOPES  [OPTIONS]`; `#` starts a
comment:

    # name        token (or sha256:<64 hex digits>)                            scopes
    web           sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8  search
    ingest        sha256:...                                                    search,index
    ops           sha256:...                                                    all
    search-svc    sha256:...                                                    search  unlimited

`TOKEN` is the token itself or, better, `sha256:` and the hex SHA-256 of the token's bytes
(`printf '%s' "$TOKEN" | sha256sum`): the file then holds nothing a caller could send.
`SCOPES` is a comma list of search, index, admin (or `all`). The one option, `unlimited`,
exempts the token from the per-scope rate and concurrency limits (the search service's own
token on the encoder). `--token T` still works beside or instead of a file: a token named
`token` with every scope.

Presented tokens are hashed and compared with every entry's hash by `hmac.compare_digest`;
neither a token nor its hash is ever logged (errors name the file, line and token name).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("clipsearch.access")

SEARCH, INDEX, ADMIN = "search", "index", "admin"
SCOPES = (SEARCH, INDEX, ADMIN)
LEGACY_NAME = "token"  # the name --token's caller has in logs, metrics and limits
UNLIMITED = "unlimited"
HASH_PREFIX = "sha256:"

_SEARCH_SERVICE = "/clipsearch.search.v1.Search/"
_ENCODER_SERVICE = "/clipsearch.encoder.v1.Encoder/"

# Every RPC of both services and the scope it needs. A test checks that each method of
# each service descriptor is here: a new RPC must be given its scope explicitly.
METHOD_SCOPES: dict[str, str] = {
    _SEARCH_SERVICE + "SearchText": SEARCH,
    _SEARCH_SERVICE + "SearchImage": SEARCH,
    _SEARCH_SERVICE + "SearchSimilar": SEARCH,
    _SEARCH_SERVICE + "SearchCombined": SEARCH,
    _SEARCH_SERVICE + "Get": SEARCH,
    _SEARCH_SERVICE + "Stats": SEARCH,
    _SEARCH_SERVICE + "Index": INDEX,
    _SEARCH_SERVICE + "Delete": ADMIN,
    _SEARCH_SERVICE + "FindDuplicates": ADMIN,
    _ENCODER_SERVICE + "EncodeText": SEARCH,
    _ENCODER_SERVICE + "EncodeImage": SEARCH,
    _ENCODER_SERVICE + "GetModelInfo": SEARCH,
}

_NAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,64}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


def scope_of(method: str) -> str:
    """The scope a full method name (`/pkg.Service/Method`) needs; `admin` when unmapped."""
    scope = METHOD_SCOPES.get(method)
    if scope is None:
        log.warning("no scope declared for %s: it needs the admin scope", method)
        return ADMIN
    return scope


def token_digest(token: str) -> bytes:
    """The SHA-256 of a token's UTF-8 bytes: what the token file may hold (as hex)."""
    return hashlib.sha256(token.encode()).digest()


class TokenFileError(ValueError):
    """The token file cannot be used; the message names the file and line, never a token."""


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: its token's name, scopes, and whether limits apply."""

    name: str
    scopes: frozenset[str]
    limited: bool = True


@dataclass(frozen=True)
class TokenEntry:
    """One accepted token: who it is, and the SHA-256 of its value."""

    caller: Caller
    digest: bytes


def parse_scopes(text: str) -> frozenset[str]:
    """`search,index` -> {search, index}; `all` means every scope."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    if "all" in names:
        names = (names - {"all"}) | set(SCOPES)
    unknown = sorted(names - set(SCOPES))
    if unknown or not names:
        raise ValueError(f"scopes must be a comma list of {', '.join(SCOPES)} or all, "
                         f"got {text!r}")
    return frozenset(names)


def parse_token_lines(lines: Iterable[str], source: str) -> list[TokenEntry]:
    """The entries of a token file's lines; TokenFileError on the first bad line."""
    entries: list[TokenEntry] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{source}:{number}"
        if len(fields) < 3:
            raise TokenFileError(f"{where}: expected NAME TOKEN SCOPES [unlimited], "
                                 f"got {len(fields)} field(s)")
        name, secret, scopes_text, *options = fields
        if not _NAME.match(name):
            raise TokenFileError(f"{where}: bad token name (letters, digits, _.@:- only, "
                                 f"at most 64)")
        if name in names or name == LEGACY_NAME:
            raise TokenFileError(f"{where}: the name {name!r} is used twice (or is the "
                                 f"reserved name of --token)")
        if secret.startswith(HASH_PREFIX):
            hex_digest = secret[len(HASH_PREFIX):].lower()
            if not _HEX.match(hex_digest):
                raise TokenFileError(f"{where}: token {name!r}: sha256: must be followed by "
                                     f"64 hex digits")
            digest = bytes.fromhex(hex_digest)
        else:
            digest = token_digest(secret)
        if digest in digests:
            raise TokenFileError(f"{where}: token {name!r} has the same value as an earlier "
                                 f"line")
        try:
            scopes = parse_scopes(scopes_text)
        except ValueError as exc:
            raise TokenFileError(f"{where}: token {name!r}: {exc}") from None
        bad = [o for o in options if o != UNLIMITED]
        if bad:
            raise TokenFileError(f"{where}: token {name!r}: unknown option {bad[0]!r} "
                                 f"(the one option is {UNLIMITED!r})")
        names.add(name)
        digests.add(digest)
        entries.append(TokenEntry(Caller(name, scopes, UNLIMITED not in options), digest))
    return entries


def read_token_file(path: str | Path) -> list[TokenEntry]:
    """The entries of the token file at `path` (TokenFileError when unreadable or bad)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read the token file {path}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
    return parse_token_lines(text.splitlines(), str(path))


class TokenTable:
    """The accepted tokens at one moment; `find` compares in constant time per entry."""

    def __init__(self, entries: Sequence[TokenEntry]) -> None:
        self.entries = tuple(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def find(self, presented: str) -> Caller | None:
        """The caller whose token is `presented`, or None. Every entry is compared (no
        early exit), each with compare_digest, so the time taken says nothing about
        which entry, if any, matched or how much of it."""
        digest = token_digest(presented)
        found: Caller | None = None
        for entry in self.entries:
            if hmac.compare_digest(digest, entry.digest) and found is None:
                found = entry.caller
        return found


class AccessControl:
    """The tokens a service accepts: `--token` (every scope) and the token file, which
    `reload()` reads again (on SIGHUP). A reload that fails keeps the tokens in force."""

    def __init__(self, token: str = "", token_file: str = "") -> None:
        self.token_file = token_file
        self._legacy = ([TokenEntry(Caller(LEGACY_NAME, frozenset(SCOPES)), token_digest(token))]
                        if token else [])
        self.table = TokenTable(self._legacy + self._read())

    @property
    def enabled(self) -> bool:
        """Whether calls need a token at all."""
        return bool(self._legacy or self.token_file)

    def _read(self) -> list[TokenEntry]:
        return read_token_file(self.token_file) if self.token_file else []

    def reload(self) -> bool:
        """Reads the token file again; the next call on sees the new tokens. False (and an
        error logged) when the file is bad: the tokens in force stay."""
        if not self.token_file:
            return False
        try:
            entries = self._read()
        except TokenFileError as exc:
            log.error("token file not reloaded, the previous tokens stay in force: %s", exc)
            return False
        self.table = TokenTable(self._legacy + entries)
        log.info("token file %s reloaded: %d token(s)", self.token_file, len(entries))
        return True

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller | None:
        """The caller whose `authorization: Bearer <token>` is in `metadata`, or None."""
        for key, value in metadata or ():
            if key != "authorization":
                continue
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, presented = text.partition(" ")
            if scheme.lower() == "bearer" and presented:
                return self.table.find(presented.strip())
            return None
        return None
