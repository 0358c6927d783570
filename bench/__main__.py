"""``python -m bench <scenario> [options]``: run one benchmark scenario."""

from __future__ import annotations

import argparse
import importlib
import sys

# scenario name -> module with main(argv)
SCENARIOS = {"ingest": "bench.ingest", "dlq": "bench.dlq", "batch": "bench.batch",
             "isolation": "bench.isolation", "overhead": "bench.overhead",
             "seed": "bench.seed", "report": "bench.report",
             "console": "bench.console", "latency": "bench.latency", "io": "bench.io"}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    args, rest = parser.parse_known_args()
    module = importlib.import_module(SCENARIOS[args.scenario])
    return int(module.main(rest))


sys.exit(main())
