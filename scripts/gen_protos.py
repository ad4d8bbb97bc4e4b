"""Generate the Python gRPC code from protos/ (one command: `python scripts/gen_protos.py`).

`--check` regenerates into a temporary folder and fails when the committed
code differs, so CI catches a stale checkout.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GENERATED_DIRS = ["clipsearch/encoder/v1", "clipsearch/search/v1"]


def generate(out: Path) -> None:
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}",
            f"--grpc_python_out={out}", f"--mypy_out={out}", *files]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for folder in GENERATED_DIRS:
        (out / folder / "__init__.py").write_text("")  # a regular package, so setuptools finds it


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        stale = []
        for folder in GENERATED_DIRS:
            for new in sorted((out / folder).iterdir()):
                old = ROOT / folder / new.name
                if not old.exists() or not filecmp.cmp(new, old, shallow=False):
                    stale.append(str(old.relative_to(ROOT)))
                    if not args.check:
                        old.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy(new, old)
    if args.check and stale:
        print("generated code is stale; run `python scripts/gen_protos.py`:", *stale, sep="\n  ")
        return 1
    print("generated code is current" if not stale else "regenerated:\n  " + "\n  ".join(stale))
    return 0


if __name__ == "__main__":
    sys.exit(main())
