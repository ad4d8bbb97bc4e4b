"""Structured search filters -> Milvus boolean expressions, safe against injection.

Callers never write expression text: every user value goes through `quote()`, metadata keys
are checked against a strict pattern, and a raw expression is only accepted when the
caller is allowed to send one.

Facts measured against Milvus Lite 3.2 (pure-Python expression lexer) that shape this:

* String literals accept only the escapes ``\\" \\' \\\\ \\n \\r \\t``; ``\\uXXXX`` and
  ``\\xNN`` are syntax errors, and a raw CR/LF ends the literal with an error. Other control
  characters (NUL included) are accepted raw, and so are they by the Milvus server grammar
  (``~["\\\\\\r\\n]``), so `quote()` escapes exactly those six and passes the rest through.
* ``LIKE`` escaping is unreliable: ``uri like "a\\\\%%"`` matches a literal ``%`` when the
  expression runs on the Arrow path, but once the same expression also reads a JSON path
  (``metadata["k"]``) Lite evaluates it in Python, where the backslash is a literal
  character and ``%``/``_`` stay wildcards. A URI prefix is therefore expressed as a
  code-point range, ``uri >= "p" and uri < "p'"`` (p' = p with its last character
  incremented), which is exact on Lite (Arrow and Python) and on the server (bytewise
  UTF-8 order equals code-point order).
* ``metadata["k"] in [...]`` is rejected by Lite ("left side of 'in' must be a field
  reference"), so several values become an ``or`` of equalities.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_URI_BYTES",
    "MAX_VALUES_PER_KEY",
    "FilterError",
    "MetadataMatch",
    "RawFilterDenied",
    "StructuredFilter",
    "build_expression",
    "quote",
]

MAX_VALUES_PER_KEY = 100
MAX_URI_BYTES = 2048  # the uri VARCHAR's max_length; a longer prefix can match nothing
_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_MAX_CODE_POINT = 0x10FFFF
_SURROGATES = range(0xD800, 0xE000)

# The only escapes both Lite and the server understand; everything else goes in raw.
_ESCAPES = {"\\": "\\\\", '"': '\\"', "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPE_TABLE = str.maketrans(_ESCAPES)


class FilterError(ValueError):
    """The filter is malformed; the service maps it to INVALID_ARGUMENT."""


class RawFilterDenied(PermissionError):
    """A raw expression was sent by a caller not allowed to; maps to PERMISSION_DENIED."""


@dataclass(frozen=True)
class MetadataMatch:
    """Rows whose metadata[key] (a JSON string) equals one of `values`."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class StructuredFilter:
    """What a caller may filter on. Parts are ANDed; an empty filter matches everything."""

    uri_prefix: str = ""
    metadata: tuple[MetadataMatch, ...] = ()
    expression: str = ""  # raw Milvus expression, privileged

    def is_empty(self) -> bool:
        return not self.uri_prefix and not self.metadata and not self.expression.strip()


def quote(value: str) -> str:
    """Return `value` as a double-quoted Milvus string literal that parses back to `value`."""
    if not isinstance(value, str):
        raise FilterError(f"expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates cannot travel to Milvus at all
        raise FilterError(f"string is not valid Unicode: {e.reason}") from None
    return '"' + value.translate(_ESCAPE_TABLE) + '"'


def _successor(prefix: str) -> str | None:
    """Smallest string greater than every string starting with `prefix` (None: no bound)."""
    chars = list(prefix)
    while chars:
        cp = ord(chars[-1]) + 1
        if cp in _SURROGATES:  # not storable; skip to the next real code point
            cp = _SURROGATES.stop
        if cp <= _MAX_CODE_POINT:
            chars[-1] = chr(cp)
            return "".join(chars)
        chars.pop()  # U+10FFFF cannot be incremented: carry into the previous character
    return None


def _uri_prefix_clause(prefix: str) -> str:
    if len(prefix.encode("utf-8", errors="surrogatepass")) > MAX_URI_BYTES:
        raise FilterError(f"uri_prefix is longer than the maximum uri ({MAX_URI_BYTES} bytes)")
    lower = f"uri >= {quote(prefix)}"
    upper = _successor(prefix)
    return lower if upper is None else f"{lower} and uri < {quote(upper)}"


def _metadata_clause(match: MetadataMatch) -> str:
    key = match.key
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise FilterError(f"invalid metadata key {key!r}: must match ^[A-Za-z0-9_.-]{{1,128}}$")
    values = match.values
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise FilterError(f"metadata key {key!r}: values must be a list of strings")
    if not 1 <= len(values) <= MAX_VALUES_PER_KEY:
        raise FilterError(
            f"metadata key {key!r}: needs 1 to {MAX_VALUES_PER_KEY} values, got {len(values)}"
        )
    field = f"metadata[{quote(key)}]"
    literals = list(dict.fromkeys(quote(v) for v in values))  # dedupe, keep order
    if len(literals) == 1:
        return f"{field} == {literals[0]}"
    # Lite rejects `in` on a JSON path, so spell the set out as equalities.
    return " or ".join(f"{field} == {lit}" for lit in literals)


def _check_balanced(expression: str) -> None:
    """Reject a raw expression whose parentheses or quotes would escape its own group.

    It is wrapped in parentheses and ANDed with the structured parts, so `a) or (true`
    must not be able to close that group early. Milvus still checks the full syntax.
    """
    depth = 0
    in_string = ""
    escaped = False
    for ch in expression:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == in_string:
                in_string = ""
        elif ch in "\"'":
            in_string = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise FilterError("raw expression has an unbalanced ')'")
    if in_string:
        raise FilterError("raw expression has an unterminated string literal")
    if depth:
        raise FilterError("raw expression has an unbalanced '('")


def build_expression(f: StructuredFilter, allow_raw: bool) -> str:
    """Milvus filter text for `f`: "" when empty, else parenthesised parts joined by `and`."""
    parts: list[str] = []
    if f.uri_prefix:
        parts.append(_uri_prefix_clause(f.uri_prefix))
    for match in f.metadata:
        parts.append(_metadata_clause(match))
    raw = f.expression.strip()
    if raw:
        if not allow_raw:
            raise RawFilterDenied("raw filter expressions are not allowed for this caller")
        _check_balanced(raw)
        parts.append(raw)
    return " and ".join(f"({p})" for p in parts)
