"""``pipeline send``: NDJSON events through ``publish_many``."""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections import Counter
from typing import IO, Any

import click

from pipeline.cli.base import EXIT_BROKER, EXIT_REJECTED, cli, progress_bar, runtime
from pipeline.errors import VALUE_REPR_MAX_CHARS, BrokerUnavailable, clip


@cli.command()
@click.argument("source", type=click.File("rb"))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def send(source: IO[bytes], as_json: bool) -> None:
    """Publish NDJSON events from SOURCE (a file, or - for stdin) with publish_many."""
    rt = runtime()
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    rejected: list[dict[str, Any]] = []
    chunk_size = rt.settings.publish_batch_size
    numbered = ((n, line) for n, line in enumerate(source, start=1) if line.strip())
    with _progress(source) as bar:
        while chunk := list(itertools.islice(numbered, chunk_size)):
            try:
                results = rt.publisher.publish_many([line for _, line in chunk])
            except BrokerUnavailable as exc:
                click.echo(f"\nerror: {exc}; {counts['accepted']} accepted before it, "
                           f"line {chunk[0][0]} and later were not sent", err=True)
                sys.exit(EXIT_BROKER)
            for (number, _), result in zip(chunk, results, strict=True):
                counts[result.outcome] += 1
                if result.outcome == "rejected":
                    reasons[result.reason or "?"] += 1
                    rejected.append({"line": number, "reason": result.reason,
                                     "errors": result.errors})
            bar.update(sum(len(line) for _, line in chunk))
    summary = {"accepted": counts["accepted"], "duplicate": counts["duplicate"],
               "rejected": counts["rejected"], "rejected_by_reason": dict(reasons),
               "rejected_lines": rejected}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        by_reason = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
        click.echo(f"accepted {counts['accepted']}, duplicate {counts['duplicate']}, "
                   f"rejected {counts['rejected']}" + (f" ({by_reason})" if by_reason else ""))
        for item in rejected:
            for err in item["errors"] or [{"field": "-", "message": item["reason"]}]:
                click.echo(f"  line {item['line']}: {_problem(err)}")
    sys.exit(EXIT_REJECTED if rejected else 0)


def _problem(err: dict[str, Any]) -> str:
    """``field='value': message``, the value already clipped (:meth:`FieldProblem.as_dict`)
    and left out for a missing field; a JSON error's message names the column."""
    if "value" not in err or err["field"] == "<document>":  # the line itself: in the file
        return f"{err['field']}: {err['message']}"
    return f"{err['field']}={clip(repr(err['value']), VALUE_REPR_MAX_CHARS)}: {err['message']}"


def _progress(source: IO[bytes]) -> Any:
    """A progress bar in bytes, sized by the file when it has a size."""
    try:
        size = os.fstat(source.fileno()).st_size
    except (OSError, ValueError):
        size = 0
    return progress_bar(size, "sending")


