"""Celery's worker consumer without native delayed delivery, for RabbitMQ apps whose
only quorum queues are the pipeline's tier queues.

Celery 5.5+ turns on *native delayed delivery* in every worker of an app with a
quorum queue: at each start it declares 28 ``celery_delayed_*`` queues and their
exchanges, binds every queue of the app to them, and warns for each queue on a
direct exchange (every tier queue is one). It exists for countdown and ETA
messages, and the pipeline sends none: retries, deferrals and handler delays wait
in the durable Redis schedule (:mod:`pipeline.worker.schedule`) and are moved onto their
queue when due. So :func:`pipeline.app.attach` gives the app this consumer
(``worker_consumer``) unless the app has quorum queues of its own, or a consumer
class of its own: the step is theirs to keep then.
"""

from __future__ import annotations

from celery.worker.consumer import Consumer as CeleryConsumer

__all__ = ["CONSUMER_PATH", "DELAYED_DELIVERY_STEP", "Consumer"]

CONSUMER_PATH = "pipeline.worker.consumer:Consumer"  # the worker_consumer setting naming it
DELAYED_DELIVERY_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"  # left out


class Consumer(CeleryConsumer):
    """Celery's consumer, every default step but native delayed delivery."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc,valid-type]  # stubbed as a variable
        default_steps = [s for s in CeleryConsumer.Blueprint.default_steps
                         if s != DELAYED_DELIVERY_STEP]
