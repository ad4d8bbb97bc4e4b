"""Run the benchmarks: `python -m benchmarks [all|ingest|search|encoder|collection] ...`

Each section compares against a baseline measured in the same run and records its numbers
in results/benchmarks.json; results/benchmarks.md (tables) and results/*.png (plots) are
rewritten from that file after every run, with the machine and versions they ran on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchmarks.report as report
import benchmarks.sections as sections

RESULTS = Path(__file__).resolve().parent.parent / "results"
SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "encoder": sections.encoder_alone,
    "service": sections.encoder_service,
    "ingest": sections.ingest,
    "search": sections.text_search,
    "collection": sections.collection_size,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", default=["all"],
                        help=f"sections to run: all or any of {', '.join(SECTIONS)}")
    parser.add_argument("--images", type=int, default=400,
                        help="images for ingest (the 200 sample photos, repeated)")
    parser.add_argument("--sizes", default="10000,100000",
                        help="collection sizes for the collection benchmark")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    chosen = list(SECTIONS) if "all" in args.which else args.which
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "benchmarks.json"
    results: dict[str, Any] = json.loads(store.read_text()) if store.exists() else {}
    for name in chosen:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        results[name] = {"machine": report.machine(), **SECTIONS[name](args),
                         "seconds": round(time.perf_counter() - started, 1)}
        store.write_text(json.dumps(results, indent=2))
        print(json.dumps(results[name], indent=2), flush=True)
    report.write(results, args.out)
    print(f"results: {args.out / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
