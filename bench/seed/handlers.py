"""The seed scenario's pipeline handler (``PIPELINE_HANDLER_MODULES='["bench.seed.handlers"]'``).

One handler for every traffic class: it calls the partner API through the
``partner-api`` circuit breaker. The stock side's twin is :mod:`bench.seed.stock`.
"""

from __future__ import annotations

from bench.seed.downstream import call
from pipeline.core.events import Event
from pipeline.core.handlers import current, handler

DOWNSTREAM = "partner-api"  # the breaker's name in the scenario's config


@handler("*", name="seed.deliver", downstreams=[DOWNSTREAM])
def deliver(event: Event) -> None:
    call(current().state, str(event.id), event.type)
