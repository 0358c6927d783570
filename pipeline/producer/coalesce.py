"""Gathering single publishes into batches for up to ``batch_wait_ms``.

On a tier with ``batch_size`` and ``batch_wait_ms``, an event published on its
own (``publish``, ``POST /events``) waits up to ``batch_wait_ms`` for others
published concurrently (other threads: API requests, producer threads), so they
share one batch message. The first caller of a group leads: it waits until the
group is full or its time is up, publishes the group, and hands every caller its
own result — or the same exception. Nobody is told ``accepted`` before the group
is on the broker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["Coalescer"]

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Slot(Generic[In, Out]):
    item: In
    done: threading.Event = field(default_factory=threading.Event)
    result: Out | None = None
    error: BaseException | None = None


class Coalescer(Generic[In, Out]):
    """Groups concurrent ``submit`` calls; ``flush`` publishes one group at a time."""

    def __init__(self, flush: Callable[[list[In]], list[Out]], *, wait_s: float,
                 max_items: int) -> None:
        self._flush = flush
        self._wait_s = wait_s
        self._max_items = max(1, max_items)
        self._lock = threading.Condition()
        self._pending: list[_Slot[In, Out]] = []
        self._leading = False  # a leader is gathering or publishing a group

    def submit(self, item: In) -> Out:
        slot: _Slot[In, Out] = _Slot(item)
        with self._lock:
            self._pending.append(slot)
            if len(self._pending) >= self._max_items:
                self._lock.notify_all()  # a full group: its leader goes now
            while not slot.done.is_set():
                if self._leading or self._pending[0] is not slot:
                    self._lock.wait()  # a follower, or next in line behind a leader
                    continue
                self._leading = True  # the head of the line leads the next group
                deadline = time.monotonic() + self._wait_s
                while (len(self._pending) < self._max_items
                       and (left := deadline - time.monotonic()) > 0):
                    self._lock.wait(left)
                group = self._pending[:self._max_items]
                del self._pending[:self._max_items]
                self._lock.release()  # publish without holding up newcomers
                try:
                    self._publish(group)
                finally:
                    self._lock.acquire()
                    self._leading = False
                    self._lock.notify_all()  # the group's callers, and the next leader
        if slot.error is not None:
            raise slot.error
        assert slot.result is not None
        return slot.result

    def _publish(self, group: list[_Slot[In, Out]]) -> None:
        try:
            results = self._flush([s.item for s in group])
        except BaseException as exc:  # every caller of the group learns it
            for s in group:
                s.error = exc
                s.done.set()
            return
        for s, result in zip(group, results, strict=True):
            s.result = result
            s.done.set()
