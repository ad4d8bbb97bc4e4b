"""The `clipsearch` command: run the services, index folders, search them, make test models.

Only `serve encoder` and `model` import torch, when they run: the client commands, `up`
and `serve search` work where it is not installed (the search tier's install)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

from client.errors import ClipsearchError
from clipsearch import (
    commands_client,
    commands_eval,
    commands_search,
    commands_token,
    commands_up,
    lifecycle,
)
from clipsearch.logs import configure_logging
from clipsearch.options import add_options, from_namespace
from clipsearch.serving import ServiceConfigError

Handler = Callable[[argparse.Namespace], int]
# Which install extra brings a package that only some commands import.
EXTRA_OF = {"torch": "encoder", "torchvision": "encoder", "clip": "encoder",
            "pymilvus": "search", "milvus_lite": "search", "threadpoolctl": "search"}


def _serve_encoder(args: argparse.Namespace) -> int:
    from encoder_service.config import EncoderConfig

    config = from_namespace(EncoderConfig, args)
    try:
        config.check()
        config.apply_openmp_policy()  # before the server's imports load torch
    except ValueError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    from encoder_service.server import serve

    configure_logging(config.log_json)
    return asyncio.run(serve(config))


def _serve_search(args: argparse.Namespace) -> int:
    from search_service.config import SearchConfig
    from search_service.server import serve

    config = from_namespace(SearchConfig, args)
    configure_logging(config.log_json)
    return asyncio.run(serve(config))


def _model_random(args: argparse.Namespace) -> int:
    from encoder_service.testmodels import save_random_vit_b32

    path = save_random_vit_b32(Path(args.out), seed=args.seed)
    print(f"wrote a random-weight ViT-B/32 (seed {args.seed}) to {path}")
    return 0


def _model_tiny(args: argparse.Namespace) -> int:
    from encoder_service.testmodels import train_tiny_clip

    path = train_tiny_clip(Path(args.out), seed=args.seed, log=print)
    print(f"wrote the tiny shapes CLIP (seed {args.seed}) to {path}")
    return 0


def _model_shapes(args: argparse.Namespace) -> int:
    from encoder_service.testmodels import shape_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = shape_dataset(n_per_class=args.per_caption, seed=args.seed)
    for i, (image, text) in enumerate(dataset):
        image.save(out / f"{text.replace(' ', '_')}_{i:04d}.png")
    print(f"wrote {len(dataset)} pictures of coloured shapes to {out} (file names say what "
          f"they show)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from encoder_service.config import ENV_PREFIX as ENCODER_ENV
    from encoder_service.config import EncoderConfig
    from search_service.config import ENV_PREFIX as SEARCH_ENV
    from search_service.config import SearchConfig

    parser = argparse.ArgumentParser(prog="clipsearch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run one service").add_subparsers(
        dest="service", required=True)
    encoder = serve.add_parser("encoder", help="the CLIP encoder gRPC service")
    add_options(encoder, EncoderConfig, ENCODER_ENV)
    encoder.set_defaults(handler=_serve_encoder)

    search = serve.add_parser("search", help="the search service (Milvus + encoder client)")
    add_options(search, SearchConfig, SEARCH_ENV)
    search.set_defaults(handler=_serve_search)
    commands_client.add_commands(commands)
    commands_search.add_commands(commands)
    commands_token.add_commands(commands)
    commands_eval.add_commands(commands)
    up = commands.add_parser("up", help="start an encoder and a search service together; "
                                        "SIGTERM/SIGINT/SIGHUP stop both")
    commands_up.add_up_options(up)
    up.set_defaults(handler=commands_up.run_up)

    model = commands.add_parser("model", help="make test models (no real weights needed)")
    kinds = model.add_subparsers(dest="kind", required=True)
    random_model = kinds.add_parser("random-vit-b32",
                                    help="a random-weight model of the exact ViT-B/32 shape")
    tiny = kinds.add_parser("tiny", help="a tiny CLIP trained here on generated shapes")
    for sub, handler in ((random_model, _model_random), (tiny, _model_tiny)):
        sub.add_argument("--out", required=True, help="checkpoint file to write")
        sub.add_argument("--seed", type=int, default=0)
        sub.set_defaults(handler=handler)
    shapes = kinds.add_parser("shapes", help="a folder of generated pictures for the tiny model "
                                             "(held out: not what it was trained on)")
    shapes.add_argument("--out", required=True, help="folder to write PNGs into")
    shapes.add_argument("--per-caption", type=int, default=5)
    shapes.add_argument("--seed", type=int, default=4242, help="training used other seeds")
    shapes.set_defaults(handler=_model_shapes)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one `clipsearch` command; its exit code."""
    lifecycle.follow_parent()  # a service started by `clipsearch up` ends with it
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ClipsearchError as exc:
        print(f"error: {exc.code.name}: {exc}", file=sys.stderr)
        return 2
    except ServiceConfigError as exc:  # a service's settings (token file, TLS, limits)
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"error: this command needs the {exc.name!r} package, installed by the "
              f"'{extra}' extra: pip install 'clipsearch[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
