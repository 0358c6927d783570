"""Stop consuming while the state store is down, instead of reject-looping (RabbitMQ).

With RabbitMQ the state store (``state_url``) is a Redis of its own. While it does
not answer, a task can neither count its delivery, schedule a retry nor write its
done mark: it rejects its message for redelivery (``settle_or_requeue`` in
:mod:`pipeline.worker.task`) and RabbitMQ hands it straight back. That loop burns CPU,
floods the logs and counts against the queue's ``x-delivery-limit``
(:mod:`pipeline.dlq.dlx`), which would dead-letter healthy work.

:class:`StateWatchStep`, a consumer bootstep in the worker's main process, PINGs
the state store every :data:`PROBE_INTERVAL_S` on a thread of its own. At the
first failed PING it cancels the worker's consumers of its tier queues (Celery's
``cancel_task_queue``, run on the event loop): messages already prefetched run or
are rejected once more, nothing new is delivered. It keeps probing with
exponential backoff and full jitter (:func:`pipeline.core.retry.compute_backoff`, at
most :data:`PROBE_BACKOFF_MAX_S` apart), says so once per :data:`DOWN_REPORT_S`
(one line: how long, how many failed probes, the last error), and resumes
consuming (``add_task_queue``) at the first PING answered. The main process sees
the outage itself, so no signal from the pool's children is needed.

:func:`report_state_failure` is for a task that meets the outage before the probe
does: it makes this process's watch probe at once (when the task runs in the main
process) and holds the task :data:`REPORT_HOLD_S` before it rejects, so a pool
child rejects about once per probe interval until consumption stops.

On a Redis broker the state store *is* the broker: while it is down the worker
consumes nothing anyway, so the step does nothing there.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
from celery import bootsteps

from pipeline.core import state
from pipeline.core.retry import compute_backoff
from pipeline.worker.runtime import runtime_for

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["StateWatch", "StateWatchStep", "report_state_failure"]

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0  # how often the state store is PINGed while it answers
PROBE_TIMEOUT_S = 0.5  # a PING (or connect) slower than this counts as a failure
PROBE_BACKOFF_MIN_S = 0.25  # shortest wait between probes while it is down
PROBE_BACKOFF_MAX_S = 5.0  # longest wait between probes while down: bounds the resume delay
REPORT_HOLD_S = 1.0  # a task that reports a failure waits this long before it rejects
STOP_TIMEOUT_S = 2.0  # how long stopping waits for the probe thread
DOWN_REPORT_S = 10.0  # while it stays down, one log line with the counts this often

_WATCHES: weakref.WeakKeyDictionary[Any, StateWatch] = weakref.WeakKeyDictionary()


class StateWatch:
    """Probes the state store on a daemon thread; ``on_down`` at the first failed
    probe, ``on_up`` at the first answered one after that."""

    def __init__(self, ping: Callable[[], object], on_down: Callable[[], None],
                 on_up: Callable[[], None], *, down: bool = False,
                 rand: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ping = ping
        self._on_down = on_down
        self._on_up = on_up
        self._rand = rand
        self._clock = clock
        self.down = down
        self.failures = 0
        self._down_since = self._reported_at = clock()
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeline-statewatch",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_S)

    def wake(self) -> None:
        """Probe now rather than at the next interval."""
        self._wake.set()

    def probe(self) -> float:
        """Probe once, act on a change; returns the seconds until the next probe."""
        try:
            self._ping()
        except (redis.RedisError, OSError) as exc:
            self.failures += 1
            now = self._clock()
            if not self.down:
                self.down = True
                self._down_since = self._reported_at = now
                log.error("state store unreachable (%s): pausing consumption", exc)
                self._on_down()
            elif now - self._reported_at >= DOWN_REPORT_S:
                self._reported_at = now
                log.warning("state store still unreachable after %.0fs (%d failed probes; "
                            "last: %s): consumption stays paused", now - self._down_since,
                            self.failures, exc)
            return PROBE_BACKOFF_MIN_S + compute_backoff(
                self.failures, base_s=PROBE_INTERVAL_S, max_s=PROBE_BACKOFF_MAX_S,
                rand=self._rand)
        if self.down:
            log.warning("state store answers again after %.0fs and %d failed probes: "
                        "resuming consumption", self._clock() - self._down_since,
                        self.failures)
            self.down = False
            self._on_up()
        self.failures = 0
        return PROBE_INTERVAL_S

    def _run(self) -> None:
        delay_s = 0.0
        while not self._stop.is_set():
            if self._wake.wait(delay_s):
                self._wake.clear()
            if self._stop.is_set():
                return
            try:
                delay_s = self.probe()
            except Exception:  # a failing pause/resume must not end the watch
                log.exception("state watch failed; probing again")
                delay_s = PROBE_INTERVAL_S


class StateWatchStep(bootsteps.StartStopStep):
    """Consumer step: pause the tier queues while the state store is down."""

    label = "pipeline-statewatch"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        settings = runtime_for(c.app).settings
        consumed = list(c.app.amqp.queues.consume_from or c.app.amqp.queues)
        self.queues = [q for q in consumed if settings.tier_for_queue(q) is not None]
        self.active = not settings.broker_is_redis and bool(self.queues)
        self.paused: set[str] = set()  # kept across consumer restarts (reconnects)
        self.watch: StateWatch | None = None

    def start(self, c: Any) -> None:
        if not self.active:
            return
        if c.hub is None:
            log.warning("no event loop: consumption is not paused while the state store "
                        "is down")
            return
        runtime = runtime_for(c.app)
        url = runtime.settings.effective_state_url
        assert url is not None  # required with RabbitMQ (config check)
        client = state.connect(url, runtime.settings.broker_transport_options,
                               timeout_s=PROBE_TIMEOUT_S)
        self.watch = self._new_watch(c, client.ping)
        _WATCHES[c.app] = self.watch
        self.watch.start()

    def stop(self, c: Any) -> None:
        if self.watch is not None:
            self.watch.stop()
            self.watch = None

    shutdown = stop

    def _new_watch(self, c: Any, ping: Callable[[], object]) -> StateWatch:
        """A watch whose news, down or up, has the event loop follow it."""
        def follow() -> None:
            c.hub.call_soon(self._follow, c)

        return StateWatch(ping, follow, follow, down=bool(self.paused))

    def _follow(self, c: Any) -> None:
        """On the event loop: pause or resume as the watch says *now*. A down and the
        up after it are queued as two callbacks, and the event loop runs what is
        queued in no set order (kombu keeps them in a set): when it was busy over the
        whole outage (a settle retried in ``on_failure``), acting on each callback's
        own news could resume first and pause last, leaving the queues paused for good."""
        watch = self.watch
        if watch is not None and watch.down:
            self._pause(c)
        else:
            self._resume(c)

    def _pause(self, c: Any) -> None:
        """Stop consuming our tier queues (those not stopped already)."""
        stopped = []
        for queue in self.queues:
            if c.task_consumer is not None and c.task_consumer.consuming_from(queue):
                c.cancel_task_queue(queue)
                self.paused.add(queue)
                stopped.append(queue)
        if stopped:
            log.warning("stopped consuming %s until the state store answers", stopped)

    def _resume(self, c: Any) -> None:
        """Consume the queues we paused again."""
        if not self.paused:
            return
        for queue in sorted(self.paused):
            c.add_task_queue(queue)
        log.warning("consuming %s again", sorted(self.paused))
        self.paused.clear()


def report_state_failure(app: Celery) -> None:
    """A task could not reach the state store and is about to reject its message.

    Wakes this process's watch (a task run in the worker's main process), then
    holds the caller :data:`REPORT_HOLD_S` so that, in a pool child, the main
    process's probe can pause consumption before the message comes back.
    No-op on a Redis broker.
    """
    if runtime_for(app).settings.broker_is_redis:
        return
    watch = _WATCHES.get(app)
    if watch is not None and watch.pid == os.getpid():
        watch.wake()
    time.sleep(REPORT_HOLD_S)
