"""``python -m bench <scenario> [options]``: run one benchmark scenario."""

from __future__ import annotations

import argparse
import importlib
import sys

# each runs bench.scenarios.<name>.main(argv)
SCENARIOS = ("batch", "console", "dlq", "ingest", "io", "isolation", "latency", "overhead",
             "report", "seed")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    args, rest = parser.parse_known_args()
    module = importlib.import_module(f"bench.scenarios.{args.scenario}")
    return int(module.main(rest))


if __name__ == "__main__":
    sys.exit(main())
