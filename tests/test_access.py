"""Scoped tokens and per-caller limits without a server: the method -> scope map covers
every RPC, the token file's format and its errors, constant-time lookup, token buckets,
concurrency counts, and the client's --token-file."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pytest

from clipsearch.access import (
    ADMIN,
    INDEX,
    METHOD_SCOPES,
    SCOPES,
    SEARCH,
    AccessControl,
    TokenFileError,
    TokenTable,
    parse_token_lines,
    scope_of,
)
from clipsearch.client_config import bearer_token
from clipsearch.encoder.v1 import encoder_pb2
from clipsearch.limits import Limits, ScopeLimit, TokenBucket, parse_limits
from clipsearch.search.v1 import search_pb2

SERVICES = [search_pb2.DESCRIPTOR.services_by_name["Search"],
            encoder_pb2.DESCRIPTOR.services_by_name["Encoder"]]


def sha(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def test_every_rpc_of_both_services_has_an_explicit_scope() -> None:
    methods = {f"/{service.full_name}/{method.name}"
               for service in SERVICES for method in service.methods}
    missing = sorted(methods - set(METHOD_SCOPES))
    assert not missing, f"RPCs without a declared scope (they would need admin): {missing}"
    stale = sorted(set(METHOD_SCOPES) - methods)
    assert not stale, f"scopes declared for RPCs that do not exist: {stale}"
    assert set(METHOD_SCOPES.values()) <= set(SCOPES)
    # What changes or drops data is never reachable with a read token.
    assert METHOD_SCOPES["/clipsearch.search.v1.Search/Delete"] == ADMIN
    assert METHOD_SCOPES["/clipsearch.search.v1.Search/FindDuplicates"] == ADMIN
    assert METHOD_SCOPES["/clipsearch.search.v1.Search/Index"] == INDEX


def test_an_unmapped_method_fails_closed() -> None:
    assert scope_of("/clipsearch.search.v1.Search/DropEverything") == ADMIN


def test_token_file_lines() -> None:
    entries = parse_token_lines([
        "# name  token  scopes",
        "",
        f"web     {sha('web-secret-123')}   search      # read only",
        "ingest  plain-ingest-secret   search,index",
        f"ops     {sha('ops-secret').upper().replace('SHA256:', 'sha256:')}  all",
        f"svc     {sha('svc-secret')}   search  unlimited",
    ], "tokens")
    table = TokenTable(entries)
    assert len(table) == 4
    web = table.find("web-secret-123")
    assert web is not None and web.name == "web" and web.scopes == {SEARCH} and web.limited
    ingest = table.find("plain-ingest-secret")
    assert ingest is not None and ingest.scopes == {SEARCH, INDEX}
    ops = table.find("ops-secret")
    assert ops is not None and ops.scopes == set(SCOPES)
    svc = table.find("svc-secret")
    assert svc is not None and not svc.limited
    for wrong in ("", "web-secret-12", "web-secret-1234", sha("web-secret-123"),
                  hashlib.sha256(b"web-secret-123").hexdigest()):
        assert table.find(wrong) is None, wrong


@pytest.mark.parametrize(("line", "says"), [
    ("web", "expected NAME TOKEN SCOPES"),
    ("web hunter2-secret", "expected NAME TOKEN SCOPES"),
    ("web hunter2-secret read", "scopes must be"),
    ("we/b hunter2-secret search", "bad token name"),
    ("web sha256:abc search", "64 hex digits"),
    ("web hunter2-secret search sometimes", "unknown option"),
    ("token hunter2-secret search", "used twice"),
])
def test_a_bad_line_is_named_without_its_token(line: str, says: str) -> None:
    with pytest.raises(TokenFileError) as caught:
        parse_token_lines(["# header", line], "/etc/tokens")
    message = str(caught.value)
    assert message.startswith("/etc/tokens:2: ") and says in message, message
    assert "hunter2" not in message


def test_duplicate_names_and_values_are_refused() -> None:
    with pytest.raises(TokenFileError, match="used twice"):
        parse_token_lines(["a s3cret-one search", "a s3cret-two search"], "f")
    with pytest.raises(TokenFileError, match="same value"):
        parse_token_lines(["a s3cret-one search", f"b {sha('s3cret-one')} index"], "f")


def test_reload_swaps_tokens_and_a_bad_file_keeps_them(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("a alpha-secret search\nb beta-secret admin\n")
    access = AccessControl(token="legacy-secret", token_file=str(path))
    bearer = [("authorization", "Bearer beta-secret")]
    assert access.authenticate(bearer) is not None
    legacy = access.authenticate([("authorization", "Bearer legacy-secret")])
    assert legacy is not None and legacy.name == "token" and legacy.scopes == set(SCOPES)
    path.write_text("a alpha-secret search\n")
    assert access.reload()
    assert access.authenticate(bearer) is None
    assert access.authenticate([("authorization", "Bearer legacy-secret")]) is not None
    path.write_text("a alpha-secret nonsense\n")
    assert not access.reload()  # logged; what was in force stays
    assert access.authenticate([("authorization", "Bearer alpha-secret")]) is not None
    for metadata in ([], [("authorization", "alpha-secret")],
                     [("authorization", "Basic alpha-secret")]):
        assert access.authenticate(metadata) is None


def test_an_unreadable_token_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read the token file"):
        AccessControl(token_file=str(tmp_path / "missing"))


def test_limits_are_parsed_per_scope() -> None:
    limits = parse_limits("search=50/100, index=5, *=1", "search=16,*=2")
    assert limits[SEARCH] == ScopeLimit(50, 100, 16)
    assert limits[INDEX] == ScopeLimit(5, 5, 2)
    assert limits[ADMIN] == ScopeLimit(1, 1, 2)
    assert parse_limits("", "") == {s: ScopeLimit() for s in SCOPES}
    for rate, concurrency in (("read=5", ""), ("search=fast", ""), ("search=5/0", ""),
                              ("", "index=-1"), ("", "index=two"), ("search", "")):
        with pytest.raises(ValueError):
            parse_limits(rate, concurrency)


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)  # one token every 0.5 s
    now[0] = 0.25
    assert bucket.take() == pytest.approx(0.25)
    now[0] = 0.5
    assert bucket.take() == 0.0
    now[0] = 100.0  # never more than the burst
    assert [bucket.take() for _ in range(4)].count(0.0) == 3


def test_a_noisy_caller_does_not_use_up_another_callers_limits() -> None:
    now = [0.0]
    limits = Limits(parse_limits("search=1/2", "index=1"), clock=lambda: now[0])
    assert limits.admit("noisy", SEARCH) is None
    assert limits.admit("noisy", SEARCH) is None
    refusal = limits.admit("noisy", SEARCH)
    assert refusal is not None and refusal.reason == "rate"
    assert refusal.retry_after_s == pytest.approx(1.0)
    assert limits.admit("quiet", SEARCH) is None  # its own bucket
    assert limits.admit("noisy", INDEX) is None  # its own scope: no rate limit set
    held = limits.admit("noisy", INDEX)
    assert held is not None and held.reason == "concurrency" and held.retry_after_s > 0
    assert limits.admit("quiet", INDEX) is None
    limits.release("noisy", INDEX)
    assert limits.admit("noisy", INDEX) is None


def test_client_reads_its_token_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("\n  file-secret  \n")
    assert bearer_token(argparse.Namespace(token="", token_file=str(path))) == "file-secret"
    assert bearer_token(argparse.Namespace(token="flag", token_file="")) == "flag"
    with pytest.raises(SystemExit, match="not both"):
        bearer_token(argparse.Namespace(token="flag", token_file=str(path)))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit, match="empty"):
        bearer_token(argparse.Namespace(token="", token_file=str(tmp_path / "empty")))


def test_audit_describes_what_a_call_names_and_counts_what_it_did() -> None:
    from clipsearch.audit import Tally, describe_request

    ids = [f"{i:064x}" for i in range(25)]
    text = describe_request(search_pb2.DeleteRequest(ids=ids))
    assert text.startswith(f"ids={ids[0]},{ids[1]}") and text.endswith(",... (25 ids)")
    assert ids[19] in text and ids[20] not in text
    text = describe_request(search_pb2.DeleteRequest(filter=search_pb2.Filter(
        uri_prefix="/a/", metadata=[search_pb2.MetadataMatch(key="k", values=["v"])])))
    assert text == 'filter={"metadata":[{"key":"k","values":["v"]}],"uri_prefix":"/a/"}'
    assert describe_request(search_pb2.FindDuplicatesRequest(threshold=0.5)) == \
        "filter={} threshold=0.5"
    tally = Tally()
    for status in ("ADDED", "ADDED", "EXISTING", "FAILED"):
        tally.add(search_pb2.IndexResult(status=search_pb2.IndexResult.Status.Value(status)))
    assert tally.rows == 2 and tally.summary() == "items=4 ADDED=2 EXISTING=1 FAILED=1"
    deleted = Tally()
    deleted.add(search_pb2.DeleteResponse(deleted=7))
    assert deleted.rows == 7 and deleted.summary() == ""


def test_token_command_makes_a_token_and_its_file_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from clipsearch.cli import main

    out = tmp_path / "web.token"
    assert main(["token", "new", "web", "--scopes", "index,search", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    token = out.read_text().strip()
    assert out.stat().st_mode & 0o777 == 0o600 and len(token) >= 40
    assert token not in line and line.startswith("web  sha256:")
    caller = TokenTable(parse_token_lines([line], "new")).find(token)
    assert caller is not None and caller.scopes == {SEARCH, INDEX} and caller.limited
    assert main(["token", "new", "web", "--scopes", "search", "--out", str(out)]) == 2  # exists
    assert main(["token", "new", "svc", "--scopes", "read", "--out", str(tmp_path / "x")]) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO(token + "\n"))
    capsys.readouterr()
    assert main(["token", "hash"]) == 0
    assert capsys.readouterr().out.strip() == line.split()[1]
