# celery-types stubs kombu's Redis channel without its internals, which this module extends
# mypy: disable-error-code="attr-defined,misc"
"""The reliable fetch's QoS: acknowledgements ride on the next fetch, a closed channel
never takes the worker down.

Messages the fetch script recorded as unacked are not recorded again; an ack is sent
with the channel's next fetch (:data:`pipeline.worker.fetchscript.FETCH_LUA`), not as a
command of its own (the try's settle, already written, makes a redelivery of a message
whose ack was lost harmless); removing a message from kombu's indices also removes it
from the consumer's in-flight hash. On a channel closed under running tasks, acks and
rejects only forget the message: it is back on its queue or restored when the dead
consumer's lease expires (:mod:`pipeline.worker.inflight`).
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kredis
from kombu.transport import virtual

from pipeline.worker.inflight import inflight_key
from pipeline.worker.poller import Poller

__all__ = ["QoS"]

# these lines keep the logger they had before they moved out of fetch.py (the JSON
# "logger" field: log queries and alerts may select on it)
log = logging.getLogger("pipeline.worker.fetch")


class QoS(kredis.QoS):
    """kombu's Redis QoS; messages this transport fetched are already recorded."""

    def append(self, message: Any, delivery_tag: str) -> None:
        fetched: set[str] = self.channel._fetched
        if delivery_tag in fetched:
            fetched.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        """Acknowledged in the channel's next fetch (same round trip), not by a command
        of its own: the try's settle already made a redelivery harmless."""
        if self.channel.closed:  # a task that outlived its connection: see reject()
            virtual.QoS.ack(self, delivery_tag)
            return
        if self.channel._consumer:
            with self.channel._acks_lock:
                self.channel._acks.append(delivery_tag)
            virtual.QoS.ack(self, delivery_tag)
        else:
            super().ack(delivery_tag)
        if isinstance(cycle := self.channel.connection.cycle, Poller):
            cycle.credit.set()  # a consumer blocked for credit may fetch again

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """On a channel closed under a running task (the broker connection was lost;
        tasks run on), kombu would rebuild a pool from connection info that is gone
        and raise ``AttributeError``, which takes the worker down. The message is
        already back on its queue (restored at close) or in the dead consumer's
        in-flight hash, restored when its lease expires: only forget it here."""
        if self.channel.closed:
            virtual.QoS.ack(self, delivery_tag)
            return
        super().reject(delivery_tag, requeue=requeue)

    def restore_unacked(self, client: Any = None) -> None:
        """kombu's restore at close, which must never take the worker down: after a
        broker crash the channel's pool and its connection info may be gone
        (``AttributeError`` deep in kombu, which Celery's ``ignore_errors`` does not
        catch: "Unrecoverable error"). What is not restored here stays in this
        consumer's in-flight hash and the reaper puts it back after ``lost_after_s``."""
        try:
            super().restore_unacked(client)
        except Exception as exc:
            log.warning("in-flight messages not restored at close (%r); they come back "
                        "when this consumer's lease expires", exc)
            if self._delivered is not None:
                self._delivered.clear()

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        pipe = super()._remove_from_indices(delivery_tag, pipe)
        consumer = self.channel._consumer
        return pipe.hdel(inflight_key(consumer), delivery_tag) if consumer else pipe
