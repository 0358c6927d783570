"""RabbitMQ right after a deploy: tier queues nobody has declared yet read as empty
and undeclared in ``pipeline status`` and the exporter, never as a traceback or a 500."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.rabbit import (
    AMQP_URL,
    delete_queues,
    new_prefix,
    rabbit_config,
    require_rabbitmq,
)
from tests.integration.support import Stack, get, start_server, stop_server

pytestmark = pytest.mark.rabbitmq


def test_undeclared_tier_queues_read_as_depth_0_and_undeclared(redis_url: str,
                                                              tmp_path: Path) -> None:
    require_rabbitmq()
    prefix = new_prefix()
    config = rabbit_config(tmp_path / "pipeline.toml", prefix)
    stack = Stack(AMQP_URL, config, tmp_path, env_extra={"PIPELINE_STATE_URL": redis_url})
    try:
        done = subprocess.run([sys.executable, "-m", "pipeline", "status", "--json"],
                              env=stack.env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        tiers = json.loads(done.stdout)["tiers"]
        assert {(t["tier"], t["depth"], t["declared"]) for t in tiers} == {
            ("critical", 0, False), ("standard", 0, False), ("bulk", 0, False)}
        text = subprocess.run([sys.executable, "-m", "pipeline", "status"], env=stack.env(),
                              capture_output=True, text=True, timeout=60)
        assert text.returncode == 0, text.stderr
        assert "(queue not declared yet)" in text.stdout

        server = start_server(stack, "exporter", ["exporter", "--host", "127.0.0.1"],
                              stack.env(), "/metrics")
        try:
            status, body = get(server.url("/metrics"))
        finally:
            stop_server(server)
        assert status == 200
        assert "pipeline_broker_up 1.0" in body
        assert 'pipeline_queue_declared{tier="critical"} 0.0' in body
        assert 'pipeline_queue_depth{tier="critical"} 0.0' in body
    finally:
        delete_queues(prefix)
