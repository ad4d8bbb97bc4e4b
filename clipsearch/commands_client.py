"""The client side of the `clipsearch` command: up, index, search, delete, stats."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from client.search import Filter, SearchClient, image_files

DEFAULT_ADDRESS = "127.0.0.1:50052"


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("CLIPSEARCH_ADDRESS", DEFAULT_ADDRESS),
                        help=f"search service (env CLIPSEARCH_ADDRESS; default {DEFAULT_ADDRESS})")
    parser.add_argument("--token", default=os.environ.get("CLIPSEARCH_TOKEN", ""),
                        help="bearer token (env CLIPSEARCH_TOKEN)")
    parser.add_argument("--tls-ca", default=os.environ.get("CLIPSEARCH_TLS_CA", ""),
                        help="PEM CA bundle: use TLS (env CLIPSEARCH_TLS_CA)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")


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
    return SearchClient(args.address, token=args.token, tls_ca=args.tls_ca,
                        timeout_s=args.timeout)


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


def _up(args: argparse.Namespace) -> int:
    """Starts an encoder and a search service (Milvus Lite) and waits for Ctrl-C."""
    from clipsearch.health import wait_serving

    python = [sys.executable, "-m", "clipsearch.cli", "serve"]
    encoder_address = f"127.0.0.1:{args.encoder_port}"
    children = [
        subprocess.Popen([*python, "encoder", "--model", args.model, "--port",
                          str(args.encoder_port), "--device", args.device, "--precision",
                          args.precision]),
        subprocess.Popen([*python, "search", "--encoder", encoder_address, "--milvus",
                          args.milvus, "--port", str(args.port), "--host", args.host]),
    ]
    try:
        wait_serving(f"127.0.0.1:{args.port}", children, timeout_s=args.wait)
        print(f"clipsearch is up: search on {args.host}:{args.port}, encoder on "
              f"{encoder_address}, Milvus Lite at {args.milvus}. Ctrl-C stops both.",
              flush=True)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait(60)


def _health(args: argparse.Namespace) -> int:
    from clipsearch.health import health_status

    status = health_status(args.address, args.service, tls_ca=args.tls_ca,
                           tls_cert=args.tls_cert, tls_key=args.tls_key)
    print(status)
    return 0 if status == "SERVING" else 1


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    health = commands.add_parser("health", help="ask a service's grpc.health.v1 status "
                                                "(exit 0 when SERVING): for healthchecks")
    health.add_argument("--address", default=os.environ.get("CLIPSEARCH_ADDRESS",
                                                            DEFAULT_ADDRESS))
    health.add_argument("--service", default="", help="service name ('' = the server)")
    for name in ("ca", "cert", "key"):
        env = f"CLIPSEARCH_HEALTH_TLS_{name.upper()}"
        health.add_argument(f"--tls-{name}", default=os.environ.get(env, ""),
                            help=f"TLS {name} PEM for the probe (env {env})")
    health.set_defaults(handler=_health)

    up = commands.add_parser("up", help="start an encoder and a search service together")
    up.add_argument("--model", default=os.environ.get("CLIPSEARCH_ENCODER_MODEL", "ViT-B/32"),
                    help="CLIP model name or checkpoint (env CLIPSEARCH_ENCODER_MODEL)")
    up.add_argument("--milvus", default="./data/milvus.db", help="Milvus Lite path or server URI")
    up.add_argument("--port", type=int, default=50052, help="search service port")
    up.add_argument("--encoder-port", type=int, default=50051)
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--device", default="auto")
    up.add_argument("--precision", default="auto")
    up.add_argument("--wait", type=float, default=600.0, help="seconds to wait for readiness")
    up.set_defaults(handler=_up)

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

