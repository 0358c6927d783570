# celery-types stubs kombu without the transport cache, which install() resets
# mypy: disable-error-code="attr-defined"
"""Reliable fetch for the Redis broker: a message is always in its queue or recorded
as in flight, and the in-flight work of a dead consumer is back on its queue in seconds.

kombu's Redis transport fetches with ``BRPOP`` and records the message as unacked
with a second command. ``BRPOP`` removes the message on the server; if the
connection drops before the reply is read (a reset, a SIGKILL between the two
commands), the message is in no list and not in ``unacked``: gone (kombu #305,
#593, #1785; celery #4354). And a consumer whose process died leaves its unacked
messages for the global visibility-timeout sweep, the longest tier's timeout.

This transport keeps kombu's Redis transport (queues, priority sub-lists, acks,
``unacked`` hash and index, Flower's queue lengths) and changes two things:

* **Fetch is one Lua script** that pops from the first non-empty sub-list (in
  kombu's order: priority, then the fair queue rotation) and, in the same atomic
  step, writes the message into ``unacked``/``unacked_index`` and into this
  consumer's in-flight hash ``pipeline:inflight:<consumer>`` (tag -> source list
  and message). Nothing can fall between the pop and the record; the consumer
  then skips kombu's own ``unacked`` write, one round trip fewer per message. One
  fetch takes as many messages as the prefetch credit allows (up to ``FETCH_MOST``)
  and carries the acknowledgements made since the last one: an ack costs no round
  trip of its own (the try's settle, already written, makes a redelivery of a
  message whose ack was lost with the process harmless; a clean close sends them).
  While its queues are empty the consumer waits with ``BLMOVE q q RIGHT RIGHT``
  (a no-op rotation that blocks until the list is non-empty) on its first list,
  for at most ``FETCH_WAIT_S``, with the fetch sent behind it in the same write:
  the server runs the fetch as soon as the wait returns, so waking up costs one round
  trip (as ``BRPOP``). Fresh work on the default priority wakes it at once, other
  sub-lists within ``FETCH_WAIT_S``.
* **Consumers lease their in-flight work** (:mod:`pipeline.worker.inflight`): each
  consuming channel has an id registered in the sorted set ``pipeline:consumers``
  scored by a deadline that a heartbeat thread pushes ``lost_after_s`` ahead every
  ``lost_after_s / 5``. Every beat also runs the reaper: one Lua script that puts
  back, at the head of their queue, the messages still unacked in the in-flight hash
  of each consumer past its deadline (a SIGKILLed worker, a channel dropped by a
  connection reset), and forgets that consumer. Any live consumer reaps; the script
  is atomic, so a message is restored once.

Where it lives: the script in :mod:`pipeline.worker.fetchscript`, the channel that runs
it in :mod:`pipeline.worker.fetchchannel`, its acks in :mod:`pipeline.worker.fetchqos`,
the leases in :mod:`pipeline.worker.inflight`; this module holds the transports and
their install.

Design choice (docs/design.md, "Reliable fetch"): dramatiq's Redis broker fetches
with one Lua call into a per-worker ack set and requeues the sets of workers whose
heartbeats stopped; Sidekiq Pro's super_fetch ``LMOVE``s into a private per-process
list recovered at start-up. Lua is needed here because a Celery worker reads many
sub-lists (ten priorities per queue) and ``LMOVE`` takes one source; heartbeats with
a deadline give recovery in seconds without waiting for a restart of the same host.
"""

from __future__ import annotations

from typing import Any

from kombu import transport as ktransport
from kombu.transport import redis as kredis

from pipeline.worker.fetchchannel import Channel, SentinelChannel
from pipeline.worker.poller import Poller

__all__ = ["SentinelTransport", "Transport", "install"]


class Transport(kredis.Transport):
    """kombu's Redis transport with :class:`Channel`'s reliable fetch."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = Poller()  # waits for credit, not a second (workers with no event loop)


#: the kombu transport aliases this module takes over (URL scheme -> class path)
ALIASES = {"redis": "pipeline.worker.fetch:Transport", "rediss": "pipeline.worker.fetch:Transport",
           "sentinel": "pipeline.worker.fetch:SentinelTransport"}


def install() -> None:
    """Make kombu resolve ``redis://``, ``rediss://`` and ``sentinel://`` to this module's
    transports in this process. Done through kombu's alias table rather than Celery's
    ``broker_transport`` so that URLs keep their scheme: ``Connection.as_uri()``, which
    Flower reads to pick its broker client for queue lengths, still says ``redis://``."""
    for scheme, path in ALIASES.items():
        if ktransport.TRANSPORT_ALIASES.get(scheme) != path:
            ktransport.TRANSPORT_ALIASES[scheme] = path
            ktransport._transport_cache.pop(scheme, None)


class SentinelTransport(kredis.SentinelTransport):
    """kombu's Sentinel transport with :class:`Channel`'s reliable fetch."""

    Channel = SentinelChannel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = Poller()
