"""The `clipsearch` commands for searching the way users ask: pages, a relevance cut-off,
combined queries (`search`), `similar`, `get` and `duplicates`.

`add_commands` extends the `search` command of clipsearch/commands_client.py with its
options and adds the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from client.errors import DeadlineExceeded
from client.queries import Part, Query, Similar
from client.search import Hit, SearchClient
from clipsearch.commands_client import (
    _client,
    _connection_options,
    _filter,
    _filter_options,
)

__all__ = ["add_commands"]


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-score", type=float, default=None, metavar="S",
                        help="only hits with cosine similarity >= S (in [-1, 1])")
    parser.add_argument("--page-size", type=int, default=0, metavar="N",
                        help="hits per page; prints the next page's token on stderr")
    parser.add_argument("--page-token", default="", metavar="T",
                        help="the page after the one that printed this token")
    parser.add_argument("--all-pages", action="store_true",
                        help="every page in turn (--page-size each, 100 by default)")
    parser.add_argument("--collapse", type=float, default=0.0, metavar="C",
                        help="show one hit per group of near-copies (cosine >= C, e.g. 0.99)")


def _show(hits: Sequence[Hit], args: argparse.Namespace, title: str, first: int = 1) -> None:
    if args.json:
        print(json.dumps([asdict(h) for h in hits], indent=2))
    else:
        for rank, hit in enumerate(hits, first):
            print(f"{rank:3d}  {hit.score:.4f}  {hit.id}  {hit.uri}")
    if args.grid:
        from client.grid import contact_sheet

        print(f"grid written to {contact_sheet(hits, args.grid, title=title)}",
              file=sys.stderr)


def _run(client: SearchClient, query: Query, args: argparse.Namespace, title: str) -> int:
    options: dict[str, Any] = {"filter": _filter(args), "min_score": args.min_score,
                               "collapse_threshold": args.collapse}
    if args.all_pages:
        hits = [h for page in client.search_pages(query, args.page_size or 100, **options)
                for h in page.hits]
        token = ""
    else:
        paged = bool(args.page_size or args.page_token)
        page = client.search_page(query, args.page_size or args.top_k, args.page_token,
                                  paged=paged, **options)
        hits, token = page.hits, page.next_page_token
    _show(hits, args, f"{title}  ({len(hits)} hits)")
    if token:
        print(f"next page: --page-token {token}", file=sys.stderr)
    return 0


def _search(args: argparse.Namespace) -> int:
    texts = [t for t in (args.text, *args.plus) if t]
    parts = [Part(text=t) for t in texts]
    if args.image:
        parts.append(Part(image=Path(args.image).read_bytes()))
    parts += [Part(id=i) for i in args.like]
    parts += [Part(text=t, weight=-args.minus_weight) for t in args.minus]
    if not parts:
        raise SystemExit("give a text, --image PATH or --like ID (and optionally --minus TEXT)")
    query: Query
    if len(parts) == 1 and parts[0].text is not None:
        query = parts[0].text
    elif len(parts) == 1 and parts[0].image is not None:
        query = parts[0].image
    else:
        query = parts
    title = " ".join([*texts, *(["-" + m for m in args.minus]), args.image])
    with _client(args) as client:
        return _run(client, query, args, title.strip())


def _similar(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _run(client, Similar(args.id), args, f"like {args.id[:12]}")


def _get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.get(args.ids, with_vectors=args.vectors)
    if args.json:
        print(json.dumps({"items": [{**asdict(i), "vector": None if i.vector is None
                                     else i.vector.tolist()} for i in result.items],
                          "not_found": result.not_found}, indent=2))
    else:
        for item in result.items:
            print(f"{item.id}  {item.width}x{item.height}  {item.uri}  "
                  f"{json.dumps(item.metadata)}")
    for missing in result.not_found:
        print(f"not found: {missing}", file=sys.stderr)
    return 1 if result.not_found else 0


def _duplicates(args: argparse.Namespace) -> int:
    try:
        return _print_duplicates(args)
    except DeadlineExceeded as exc:
        raise DeadlineExceeded(
            f"{exc}; FindDuplicates compares every pair of the stored images, so its time "
            f"grows with the square of their number (~90 s for 100k on 2 cores): run it "
            f"again with a longer --timeout (this one: {args.timeout:g} s)") from None


def _print_duplicates(args: argparse.Namespace) -> int:
    groups = 0
    found: list[dict[str, Any]] = []
    with _client(args) as client:
        for group in client.find_duplicates(args.threshold, _filter(args)):
            groups += 1
            if args.json:
                found.append({"members": [asdict(h) for h in group]})
            else:
                print(f"group {groups} ({len(group)} images)")
                for hit in group:
                    print(f"  {hit.score:.4f}  {hit.id}  {hit.uri}")
            if args.grid:
                from client.grid import contact_sheet

                folder = Path(args.grid)
                folder.mkdir(parents=True, exist_ok=True)
                contact_sheet(group, folder / f"group-{groups:04d}.png",
                              title=f"group {groups}: {len(group)} near-duplicates")
    if args.json:
        print(json.dumps(found, indent=2))
    print(f"{groups} groups of near-duplicates at cosine >= {args.threshold}",
          file=sys.stderr)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Extends `search` (added before, by commands_client) and adds similar, get and
    duplicates."""
    search: argparse.ArgumentParser = commands.choices["search"]
    _options(search)
    search.add_argument("--text", dest="plus", action="append", default=[],
                        metavar="TEXT", help="another text part of a combined query")
    search.add_argument("--minus", action="append", default=[], metavar="TEXT",
                        help="steer away from this text (weight -MINUS_WEIGHT); repeatable")
    search.add_argument("--minus-weight", type=float, default=0.5,
                        help="weight of each --minus text, negated (default 0.5)")
    search.add_argument("--like", action="append", default=[], metavar="ID",
                        help="a stored image's id as a part of a combined query")
    search.set_defaults(handler=_search)

    similar = commands.add_parser("similar", help="more like a stored image, by its id")
    similar.add_argument("id")
    similar.add_argument("--top-k", type=int, default=10)
    similar.add_argument("--json", action="store_true", help="print hits as JSON")
    similar.add_argument("--grid", default="", metavar="PNG", help="write a contact sheet")
    _options(similar)
    _filter_options(similar)
    _connection_options(similar)
    similar.set_defaults(handler=_similar)

    get = commands.add_parser("get", help="stored images by id (exit 1 if any is missing)")
    get.add_argument("ids", nargs="+", metavar="ID")
    get.add_argument("--vectors", action="store_true", help="include the stored vectors")
    get.add_argument("--json", action="store_true")
    _connection_options(get)
    get.set_defaults(handler=_get)

    duplicates = commands.add_parser("duplicates", help="groups of near-duplicate images")
    duplicates.add_argument("--threshold", type=float, default=0.95,
                            help="cosine similarity at or above which images are "
                                 "near-duplicates (default 0.95)")
    duplicates.add_argument("--json", action="store_true", help="print groups as JSON")
    duplicates.add_argument("--grid", default="", metavar="DIR",
                            help="write one contact sheet per group into DIR")
    _filter_options(duplicates)
    _connection_options(duplicates)
    duplicates.set_defaults(handler=_duplicates)
