"""The DLQ console's pages over a large DLQ: how long each answers with N records.

Fills an own broker's DLQ as ``bench dlq`` does (five causes), logs in to the
console in process (FastAPI's TestClient: no network, no browser rendering) and
times each page, a replay dry run and a purge confirmation, beside decoding every
record (what a page that reads the whole DLQ cannot go under). The fill writes the
list as a previous version would, without the index: the one-off rebuild of the
index (``pipeline dlq reindex``) is timed first.

    python -m bench console [--records 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from bench.common import median, own_broker, write_results
from bench.scenarios.dlq import fill
from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.dlq.replay import Replayer
from pipeline.dlq.triage import RecordFilter, record_fingerprint
from pipeline.http.api import create_api
from pipeline.worker.runtime import runtime_for

TOKEN = "bench-console-token-0123456789"  # the in-process API's only token
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]*)"')


def _csrf(html: str) -> str:
    match = CSRF_FIELD.search(html)
    assert match is not None
    return match.group(1)


def _used_memory(rt: Any) -> int:
    rt.state.memory_purge()
    return int(rt.state.info("memory")["used_memory"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench console")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with own_broker() as server:
        fill(server.url, args.records)
        rt = runtime_for(create_app(load_settings(broker_url=server.url),
                                    main="bench-console"))
        rebuild_s, index_bytes = _rebuild_index(rt, args.records)
        t = _time_pages(rt, args)
    med = {k: median(v) for k, v in t.items()}
    print(f"\nmedians over {args.repeats} repeats, {args.records:,} DLQ records:")
    for k, v in med.items():
        print(f"  {k:<52} {v:6.2f}s  ({v / med['decode_all (floor)']:.3f}x the floor)")
    print(f"  {'index rebuild (one-off)':<52} {rebuild_s:6.2f}s")
    path = write_results("console", {"records": args.records, "repeats": args.repeats,
                                     "index_rebuild_s": rebuild_s,
                                     "index_bytes_per_record": index_bytes / args.records,
                                     "seconds_median": med, "seconds": t})
    print(f"results: {path}")
    return 0


def _rebuild_index(rt: Any, records: int) -> tuple[float, int]:
    """Time the one-off index rebuild; (seconds, bytes of broker memory it added)."""
    assert rt.dlq.index is not None
    list_bytes = _used_memory(rt)
    started = time.perf_counter()
    indexed = rt.dlq.index.rebuild()
    assert indexed == records, indexed
    rebuild_s = time.perf_counter() - started
    index_bytes = _used_memory(rt) - list_bytes
    print(f"index rebuild (one-off): {rebuild_s:.2f}s; index memory "
          f"{index_bytes / records:.0f} B a record")
    return rebuild_s, index_bytes


def _time_pages(rt: Any, args: argparse.Namespace) -> dict[str, list[float]]:
    """Log in to the console in process and time each page ``args.repeats`` times."""
    first = next(iter(rt.dlq.iter_records()))
    middle = rt.dlq.records(args.records // 2 + 1)[-1]
    fp = record_fingerprint(first)
    with TestClient(create_api(rt, tokens={"bench": TOKEN}),
                    follow_redirects=False) as client:
        login = client.get("/console/login")
        assert client.post("/console/login", data={
            "token": TOKEN, "csrf": _csrf(login.text)}).status_code == 303
        csrf = _csrf(client.get("/console/records?type=none").text)

        def get(path: str) -> Callable[[], Any]:
            return lambda: client.get(path)

        pages: dict[str, Callable[[], Any]] = {
            "decode_all (floor)": rt.dlq.records,
            "GET /console (groups)": get("/console"),
            "GET /console/records?fingerprint": get(f"/console/records?fingerprint={fp}"),
            "GET /console/records?handler": get("/console/records?handler=game.update"),
            "GET /console/records?tier": get("/console/records?tier=bulk"),
            "GET /console/records/{id}": get(f"/console/records/{first.id}"),
            "GET /console/records/{middle id}": get(f"/console/records/{middle.id}"),
            "POST /console/replay (dry run)": lambda: client.post("/console/replay", data={
                "fingerprint": fp, "step": "dry-run", "csrf": csrf}),
            "Replayer dry run, every record checked (CLI, HTTP)": lambda: Replayer(rt).replay(
                RecordFilter(fingerprint=fp), by="bench", dry_run=True),
            "POST /console/purge (confirmation)": lambda: client.post(
                "/console/purge", data={"fingerprint": fp, "step": "preview",
                                        "csrf": csrf}),
        }
        t: dict[str, list[float]] = {k: [] for k in pages}
        for rep in range(args.repeats):
            for name, call in pages.items():
                started = time.perf_counter()
                answer = call()
                t[name].append(time.perf_counter() - started)
                status = getattr(answer, "status_code", 200)
                assert status == 200, (name, status)
            print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in t.items()))
    return t
