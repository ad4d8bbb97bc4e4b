"""search_service.filters: exact expression text, validation, and a fuzz run against Milvus Lite."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from search_service.filters import (
    FilterError,
    MetadataMatch,
    RawFilterDenied,
    StructuredFilter,
    _successor,
    build_expression,
    quote,
)
from search_service.store import StoredImage, VectorStore

DIM = 4


# ---- text of the expressions ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("plain", '"plain"'),
        ("", '""'),
        ('say "hi"', r'"say \"hi\""'),
        ("it's", r'"it\'s"'),
        ("back\\slash", r'"back\\slash"'),
        ("line\nbreak\r\ttab", r'"line\nbreak\r\ttab"'),
        ("nul\x00 bell\x07", '"nul\x00 bell\x07"'),  # no portable escape: raw is accepted
        ("100%_ü😀", '"100%_ü😀"'),
    ],
)
def test_quote_escapes_exactly_the_specials(value: str, literal: str) -> None:
    assert quote(value) == literal


def test_quote_rejects_what_cannot_be_sent() -> None:
    with pytest.raises(FilterError):
        quote("lone \ud800 surrogate")


def test_empty_filter_is_empty_expression() -> None:
    assert StructuredFilter().is_empty()
    assert StructuredFilter(expression="   ").is_empty()
    assert build_expression(StructuredFilter(), allow_raw=False) == ""
    assert not StructuredFilter(uri_prefix="a").is_empty()


def test_parts_are_parenthesised_and_anded() -> None:
    f = StructuredFilter(
        uri_prefix="s3://bucket/",
        metadata=(MetadataMatch("camera", ("x100",)), MetadataMatch("tag", ("a", "b", "a"))),
        expression="indexed_at > 5",
    )
    assert build_expression(f, allow_raw=True) == (
        '(uri >= "s3://bucket/" and uri < "s3://bucket0")'
        ' and (metadata["camera"] == "x100")'
        ' and (metadata["tag"] == "a" or metadata["tag"] == "b")'
        " and (indexed_at > 5)"
    )


def test_prefix_upper_bound_skips_surrogates_and_carries() -> None:
    assert _successor("ab") == "ac"
    assert _successor("a\ud7ff") == "a\ue000"
    assert _successor("a\U0010ffff") == "b"
    assert _successor("\U0010ffff\U0010ffff") is None
    assert build_expression(StructuredFilter(uri_prefix="\U0010ffff"), False) == (
        '(uri >= "\U0010ffff")'
    )


@pytest.mark.parametrize(
    "key",
    ["", "a b", "key\n", 'k"] or true or metadata["k', "ü", "x" * 129, "a/b", "$meta"],
)
def test_bad_metadata_key_is_named(key: str) -> None:
    f = StructuredFilter(metadata=(MetadataMatch(key, ("v",)),))
    with pytest.raises(FilterError, match="invalid metadata key") as info:
        build_expression(f, allow_raw=False)
    assert repr(key) in str(info.value)


def test_good_metadata_keys() -> None:
    for key in ("a", "A-b_c.d", "9" * 128):
        assert build_expression(StructuredFilter(metadata=(MetadataMatch(key, ("v",)),)), False)


@pytest.mark.parametrize("count", [0, 101])
def test_value_count_is_bounded(count: int) -> None:
    f = StructuredFilter(metadata=(MetadataMatch("k", tuple(str(i) for i in range(count))),))
    with pytest.raises(FilterError, match="'k'"):
        build_expression(f, allow_raw=False)


def test_values_must_be_strings() -> None:
    with pytest.raises(FilterError):
        build_expression(StructuredFilter(metadata=(MetadataMatch("k", "abc"),)), False)  # type: ignore[arg-type]
    with pytest.raises(FilterError):
        build_expression(StructuredFilter(metadata=(MetadataMatch("k", (1,)),)), False)  # type: ignore[arg-type]


def test_raw_expression_needs_permission() -> None:
    f = StructuredFilter(uri_prefix="a", expression="width > 10")
    with pytest.raises(RawFilterDenied):
        build_expression(f, allow_raw=False)
    assert build_expression(f, allow_raw=True).endswith(" and (width > 10)")


@pytest.mark.parametrize(
    "raw", ["width > 1) or (true", "(width > 1", "uri == 'x", 'uri == "a\\"', ")("]
)
def test_raw_expression_cannot_escape_its_group(raw: str) -> None:
    with pytest.raises(FilterError):
        build_expression(StructuredFilter(uri_prefix="a", expression=raw), allow_raw=True)


def test_raw_expression_parens_inside_strings_are_fine() -> None:
    f = StructuredFilter(expression='uri == ")(\\")" or uri == \'(\'')
    assert build_expression(f, allow_raw=True) == '(uri == ")(\\")" or uri == \'(\')'


def test_prefix_longer_than_any_uri_is_rejected() -> None:
    with pytest.raises(FilterError):
        build_expression(StructuredFilter(uri_prefix="é" * 1025), allow_raw=False)


# ---- fuzz: the expression matches exactly the rows it should, on a real Milvus Lite ------


@pytest.fixture(scope="module")
def lite_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VectorStore]:
    path = Path(tmp_path_factory.mktemp("filters")) / "fuzz.db"
    store = VectorStore(str(path), dimension=DIM, model="fuzz", model_fingerprint="0")
    yield store
    store.close()


def _variants(s: str) -> list[str]:
    """Strings near `s`: ones that start with it and ones that just miss."""
    near = [s, s + "z", s + "\x00", s + "\U0010ffff", s + "%", "z" + s, s.upper(), s + s]
    if s:
        near += [s[:-1], s[:-1] + "\x00", s[1:], s.replace(s[-1], "_")]
        succ = _successor(s)
        if succ is not None:
            near.append(succ)  # the exclusive upper bound of the prefix range
    return list(dict.fromkeys(v for v in near if len(v.encode()) <= 2048))


SPECIALS = [*"%_\\\"'\n\r\t\x00 a]([)", "\U0010ffff", "\ud7ff", "\ue000", "é", "\u2028"]
fuzz_text = st.one_of(
    st.text(max_size=16), st.text(alphabet=st.sampled_from(SPECIALS), max_size=10)
)


@settings(max_examples=50, deadline=None)
@given(s=fuzz_text)
def test_fuzzed_filters_match_exactly(lite_store: VectorStore, s: str) -> None:
    uris = _variants(s)
    vector = np.ones(DIM, dtype=np.float32) / 2.0
    rows = [
        StoredImage(f"{i:064x}", vector, u, 1, 1, i, json.dumps({"k": u, "other": s}))
        for i, u in enumerate(uris)
    ]
    lite_store.upsert(rows)
    try:
        by_id = {r.id: r.uri for r in rows}

        def matched(f: StructuredFilter) -> set[str]:
            expression = build_expression(f, allow_raw=False)
            hits = lite_store.search(vector, top_k=100, expression=expression)[0]
            return {by_id[h.id] for h in hits}

        assert matched(StructuredFilter(uri_prefix=s)) == {u for u in uris if u.startswith(s)}
        assert matched(StructuredFilter(metadata=(MetadataMatch("k", (s,)),))) == {s}
        pair = (s, "z" + s)
        assert matched(StructuredFilter(metadata=(MetadataMatch("k", pair),))) == set(pair)
        # Prefix and JSON together: Lite evaluates this mix on another code path.
        both = StructuredFilter(uri_prefix=s, metadata=(MetadataMatch("other", (s,)),))
        assert matched(both) == {u for u in uris if u.startswith(s)}
    finally:
        assert lite_store.delete_ids([r.id for r in rows]) == len(rows)
