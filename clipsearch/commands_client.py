"""The client side of the `clipsearch` command: index, search, delete, stats, health.

Every command takes the connection options of clipsearch/client_config.py (flags and
CLIPSEARCH_* variables)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from client.search import Filter, SearchClient, image_files
from clipsearch.client_config import add_client_options, bearer_token


def _connection_options(parser: argparse.ArgumentParser) -> None:
    add_client_options(parser)


def _filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--uri-prefix", default="", help="only images whose uri starts so")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE[,VALUE]",
                        help="metadata filter; repeat for AND, commas for any-of")
    parser.add_argument("--filter", default="", metavar="EXPR",
                        help="raw Milvus expression (only where the service allows it)")


def _filter(args: argparse.Namespace) -> Filter | str | None:
    if args.filter:
        return str(args.filter)
    metadata: dict[str, list[str]] = {}
    for clause in args.where:
        key, sep, values = clause.partition("=")
        if not sep:
            raise SystemExit(f"--where {clause!r}: expected KEY=VALUE")
        metadata.setdefault(key, []).extend(values.split(","))
    if not (args.uri_prefix or metadata):
        return None
    return Filter(uri_prefix=args.uri_prefix, metadata=metadata)


def _client(args: argparse.Namespace) -> SearchClient:
    return SearchClient(args.address, token=bearer_token(args), tls_ca=args.tls_ca,
                        tls_cert=args.tls_cert, tls_key=args.tls_key, timeout_s=args.timeout)


def _index(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    paths = image_files(args.folder)
    if not paths:
        print(f"no images under {args.folder}", file=sys.stderr)
        return 1
    metadata = json.loads(args.metadata) if args.metadata else None
    started = time.perf_counter()
    with _client(args) as client, tqdm(total=len(paths), unit="img", desc="indexing",
                                       disable=args.quiet) as bar:
        def progress(summary: object) -> None:
            bar.n = getattr(summary, "total", 0)
            bar.set_postfix(added=getattr(summary, "added", 0),
                            existing=getattr(summary, "existing", 0),
                            failed=getattr(summary, "failed", 0), refresh=False)
            bar.refresh()
        summary = client.index_files(paths, metadata=metadata, on_result=progress)
    seconds = time.perf_counter() - started
    for failure in summary.failures:
        print(f"FAILED {failure.uri}: {failure.reason}", file=sys.stderr)
    print(f"{len(paths)} images in {seconds:.1f} s ({len(paths) / seconds:.1f} images/s): "
          f"{summary.added} added, {summary.existing} already present, {summary.failed} failed")
    if summary.error:
        print(f"error: the index stream broke off ({summary.error}); re-run the same command "
              f"to add what is missing", file=sys.stderr)
    return 1 if summary.failures or summary.error else 0


def _search(args: argparse.Namespace) -> int:
    if bool(args.text) == bool(args.image):
        raise SystemExit("give a text or --image PATH (one of them)")
    with _client(args) as client:
        if args.image:
            hits = client.search_image(Path(args.image).read_bytes(), args.top_k, _filter(args))
        else:
            hits = client.search_text(args.text, args.top_k, _filter(args))
    if args.json:
        print(json.dumps([asdict(h) for h in hits], indent=2))
    else:
        for rank, hit in enumerate(hits, 1):
            print(f"{rank:3d}  {hit.score:.4f}  {hit.uri}")
    if args.grid:
        from client.grid import contact_sheet

        title = f"{args.text or args.image}  (top {len(hits)})"
        print(f"grid written to {contact_sheet(hits, args.grid, title=title)}", file=sys.stderr)
    return 0


def _delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        deleted = client.delete(ids=args.id, filter=_filter(args))
    print(f"deleted {deleted}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stats = client.stats()
    if args.json:
        print(json.dumps(asdict(stats), indent=2))
    else:
        for key, value in asdict(stats).items():
            print(f"{key:18s} {value}")
    return 0


def _health(args: argparse.Namespace) -> int:
    from clipsearch.health import health_status

    status = health_status(args.address, args.service, timeout_s=args.timeout,
                           tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)
    print(status)
    return 0 if status == "SERVING" else 1


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    health = commands.add_parser("health", help="ask a service's grpc.health.v1 status "
                                                "(exit 0 when SERVING): for healthchecks")
    health.add_argument("--service", default="", help="service name ('' = the server)")
    _connection_options(health)
    health.set_defaults(handler=_health)

    index = commands.add_parser("index", help="index every image under a folder (resumable)")
    index.add_argument("folder")
    index.add_argument("--metadata", default="", help="JSON object stored with every image")
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    _connection_options(index)
    index.set_defaults(handler=_index)

    search = commands.add_parser("search", help="search by text (or --image PATH)")
    search.add_argument("text", nargs="?", default="")
    search.add_argument("--image", default="", help="search by this image instead")
    search.add_argument("--top-k", type=int, default=10)
    search.add_argument("--json", action="store_true", help="print hits as JSON")
    search.add_argument("--grid", default="", metavar="PNG", help="write a contact sheet")
    _filter_options(search)
    _connection_options(search)
    search.set_defaults(handler=_search)

    delete = commands.add_parser("delete", help="remove images by id or filter")
    delete.add_argument("--id", action="append", default=[], help="an image id (repeat)")
    _filter_options(delete)
    _connection_options(delete)
    delete.set_defaults(handler=_delete)

    stats = commands.add_parser("stats", help="what the collection holds")
    stats.add_argument("--json", action="store_true")
    _connection_options(stats)
    stats.set_defaults(handler=_stats)

