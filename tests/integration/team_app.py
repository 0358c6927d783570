"""A team's existing Celery app, with its own task, queue and settings,
to which the pipeline is attached (see test_attach.py)."""

from __future__ import annotations

import os

import redis
from celery import Celery
from kombu import Queue

from pipeline.app import attach
from pipeline.config.load import load_settings

app = Celery("team", broker=os.environ["PIPELINE_BROKER_URL"], set_as_current=False)
app.conf.update(
    task_queues=[Queue("team_jobs")],
    task_default_queue="team_jobs",
    task_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=7,
    broker_transport_options={"visibility_timeout": 10},
)


@app.task(name="team.record")
def record(key: str) -> None:
    redis.Redis.from_url(os.environ["PIPELINE_BROKER_URL"]).hincrby("team:effects", key, 1)


attach(app, load_settings())
