"""Writes the binary request payloads that ghz's "binary-file" configs send.

    python loadtest/make_payloads.py            # from the repository root

ghz sends a "binary-file" as the serialized request message, unchanged, on every call.
`encode_image.bin` is one `clipsearch.encoder.v1.EncodeImageRequest` holding one real
photo (a 38 KB ImageNet JPEG); the file is committed, so ghz users need not run this.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the repo's packages
    sys.path.insert(0, str(ROOT))

from clipsearch.encoder.v1 import encoder_pb2  # noqa: E402

DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "imagenet-sample" / "n02112137_chow.JPEG"
DEFAULT_OUT = ROOT / "loadtest" / "encode_image.bin"


def encode_image_request(image: Path) -> bytes:
    """One EncodeImageRequest with the file's bytes as its only image, serialized."""
    data = image.read_bytes()
    if not data:
        raise ValueError(f"{image} is empty")
    return encoder_pb2.EncodeImageRequest(images=[data]).SerializeToString()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE,
                        help="the photo to send (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where to write the payload (default: %(default)s)")
    args = parser.parse_args(argv)
    payload = encode_image_request(args.image)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(payload)
    print(f"{args.out}: EncodeImageRequest with {args.image.name} "
          f"({args.image.stat().st_size} bytes of image, {len(payload)} bytes in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
