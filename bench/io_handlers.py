"""The handler of ``python -m bench io`` (``handler_modules = ["bench.io_handlers"]``):
one GET to the downstream at ``BENCH_IO_URL``, which answers after 50 ms, with a
5 s timeout on the call (what a ``threads`` or ``gevent`` tier must bound itself).

Connections are kept alive in a process-wide pool (a LIFO queue: safe for threads,
cooperative under gevent, where every attempt is a new greenlet and a per-thread
connection would be a new one each time). Each run appends ``"<start> <end>"``
(epoch seconds) to :data:`TIMES_KEY`: the benchmark's throughput and latency.
"""

from __future__ import annotations

import http.client
import os
import queue
import time
from urllib.parse import urlsplit

from pipeline.core.events import Event
from pipeline.core.handlers import current, handler

TIMES_KEY = "bench:io:times"  # one "<start> <end>" per handler run
CALL_TIMEOUT_S = 5.0  # the handler's own bound on its call (the pool enforces none)

_idle: queue.LifoQueue[http.client.HTTPConnection] = queue.LifoQueue()


def _call() -> None:
    try:
        conn = _idle.get_nowait()
    except queue.Empty:
        where = urlsplit(os.environ["BENCH_IO_URL"])
        conn = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port,
                                          timeout=CALL_TIMEOUT_S)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"downstream answered {response.status}")
    except BaseException:
        conn.close()
        raise
    _idle.put(conn)


@handler("bench.io", name="bench.io")
def io_wait(event: Event) -> None:
    started = time.time()
    _call()
    current().state.rpush(TIMES_KEY, f"{started!r} {time.time()!r}")
