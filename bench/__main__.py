"""``python -m bench <scenario> [options]``: run one benchmark scenario."""

from __future__ import annotations

import argparse
import importlib
import sys

# each runs bench.scenarios.<name>.main(argv)
SCENARIOS = ("batch", "console", "dlq", "ingest", "io", "isolation", "latency", "overhead",
             "report", "seed")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SCENARIOS:  # the scenario parses the rest, its --help included
        module = importlib.import_module(f"bench.scenarios.{argv[0]}")
        return int(module.main(argv[1:]))
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the scenario's (--help)")
    parser.parse_args(argv)  # exits: help, or an unknown scenario named
    return 2


if __name__ == "__main__":
    sys.exit(main())
