"""Pipeline handlers for the isolation benchmark (loaded with
``PIPELINE_HANDLER_MODULES='["bench.handlers"]'``); their stock Celery twins
are in :mod:`bench.stock_app`. Both write the same Redis keys, so one reader
accounts for either side.

* ``bench.critical``: records when its handler started (``HSET``
  :data:`STARTED_KEY` event id -> epoch seconds); the sender knows when it sent.
* ``bench.mark``: the same, and counts its starts (``HINCRBY`` :data:`STARTS_KEY`),
  for the latency scenario, which checks that every event started exactly once.
* ``bench.bulk``: keeps one worker slot busy for ``payload.ms`` and counts
  itself (``INCR`` :data:`BULK_DONE_KEY`).
"""

from __future__ import annotations

import time

from bench.keys import BULK_DONE_KEY, STARTED_KEY, STARTS_KEY
from pipeline.core.events import Event
from pipeline.core.handlers import current, handler


@handler("bench.critical", name="bench.critical")
def critical(event: Event) -> None:
    current().state.hset(STARTED_KEY, str(event.id), repr(time.time()))


@handler("bench.bulk", name="bench.bulk")
def bulk(event: Event) -> None:
    time.sleep(float(event.payload.get("ms", 5)) / 1000)
    current().state.incr(BULK_DONE_KEY)


@handler("bench.mark", name="bench.mark")
def mark(event: Event) -> None:
    pipe = current().state.pipeline(transaction=False)
    pipe.hsetnx(STARTED_KEY, str(event.id), repr(time.time()))
    pipe.hincrby(STARTS_KEY, str(event.id), 1)
    pipe.execute()
