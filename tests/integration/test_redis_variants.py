"""The Redis broker behind Sentinel (``sentinel://``) and over TLS (``rediss://``), end to end.

Each variant starts servers of its own on free ports (a master plus a Sentinel that
monitors it; a TLS-only server with a throwaway CA), a real tier worker, and checks
that events are processed and that retries (the Redis retry schedule, reached
through ``pipeline.core.state.connect``) end in the DLQ. Only those processes are
stopped, by pid. The TLS variant is skipped only when the server binary lacks TLS.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from pipeline.core.retry import Reason
from pipeline.core.state import Keys, connect
from pipeline.local.embedded import find_server_binary, free_port, start_server
from tests.integration.support import Stack, wait_for, write_config

MASTER_NAME = "mymaster"
SERVER_READY_TIMEOUT_S = 10.0


def _spawn(stack: contextlib.ExitStack, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``argv``; the exit stack stops exactly this process (by pid) on teardown."""
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    stack.callback(stop)
    return process


def _wait_answering(process: subprocess.Popen[bytes], log: Path, what: str,
                    probe: Callable[[], object]) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()}")
        try:
            return bool(probe())
        except (redis.ConnectionError, redis.TimeoutError):
            return False

    wait_for(ready, SERVER_READY_TIMEOUT_S, f"{what} to answer", interval_s=0.1)


def _stack(tmp: Path, url: str, servers: contextlib.ExitStack) -> Stack:
    config = write_config(tmp / "pipeline.toml")
    table = "[broker_transport_options]\n"  # FAST_TOML declares it: add master_name to it
    config.write_text(config.read_text().replace(
        table, f'{table}master_name = "{MASTER_NAME}"\n'))
    s = Stack(url, config, tmp)
    servers.callback(s.stop)  # callbacks run last-in first-out: workers stop before servers
    s.start_worker("standard")
    return s


@pytest.fixture(scope="module")
def sentinel_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("sentinel")
    with contextlib.ExitStack() as servers:
        master = start_server(tmp / "master", persist=False)
        servers.callback(master.stop)
        port = free_port()
        conf = tmp / "sentinel.conf"  # Sentinel rewrites its config file: it must be writable
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {tmp}\n"
                        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master.port} 1\n")
        log = tmp / "sentinel.log"
        process = _spawn(servers, [find_server_binary(), str(conf), "--sentinel"], log)
        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        servers.callback(client.close)
        _wait_answering(process, log, "sentinel",
                        lambda: client.sentinel_get_master_addr_by_name(MASTER_NAME))
        yield _stack(tmp, f"sentinel://127.0.0.1:{port}/0", servers)


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("tls")
    ca, key, cert = tmp / "ca.crt", tmp / "server.key", tmp / "server.crt"
    (tmp / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for argv in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=pipeline-test-ca", "-keyout", tmp / "ca.key", "-out", ca],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", key, "-out", tmp / "server.csr"],
        ["x509", "-req", "-in", tmp / "server.csr", "-CA", ca, "-CAkey", tmp / "ca.key",
         "-CAcreateserial", "-days", "1", "-extfile", tmp / "san.ext", "-out", cert],
    ):
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True)
    port = free_port()
    log = tmp / "server.log"
    with contextlib.ExitStack() as servers:
        process = _spawn(servers, [
            find_server_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no", "--dir", str(tmp),
        ], log)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(0.5)
        text = log.read_text()  # a build without TLS: Redis 6-7.0, then Redis 7.2+/Valkey
        if process.poll() is not None and ("Bad directive" in text or "TLS support" in text):
            pytest.skip(f"{find_server_binary()} was built without TLS: {text[-300:]}")
        # CERT_REQUIRED: the spelling Celery documents; kombu and pipeline.core.state accept it.
        url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={ca}"
        client = connect(url)
        servers.callback(client.close)
        _wait_answering(process, log, "TLS server", client.ping)
        yield _stack(tmp, url, servers)


@pytest.fixture(scope="module", params=["sentinel_stack", "tls_stack"])
def stack(request: pytest.FixtureRequest) -> Stack:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def test_event_is_processed_by_a_worker_on_the_variant_broker(stack: Stack) -> None:
    result = stack.publish("demo.ok")
    assert result.id is not None, result  # accepted
    stack.wait_effect(result.id)
    assert stack.effects(result.id) == 1
    assert result.task_ids[0] in stack.workers[0].log()


def test_failing_event_retries_through_the_schedule_then_lands_in_dlq(stack: Stack) -> None:
    result = stack.publish("demo.fail")
    assert result.id is not None, result  # accepted
    record = stack.wait_dlq(result.id, timeout_s=30)
    assert record.reason is Reason.RETRIES_EXHAUSTED
    assert record.attempts == 3  # standard: max_retries = 2, each retry via the schedule
    assert record.exception == "pipeline.demo.DemoTransientError"
    assert stack.rt.schedule.pending(stack.rt.settings.queue_for("standard")) == 0
    assert "moved 1 due retries" in stack.workers[0].log()


def test_sentinel_url_writes_to_the_master_the_sentinel_names(sentinel_stack: Stack) -> None:
    result = sentinel_stack.publish("demo.ok")
    assert result.id is not None, result  # accepted
    sentinel_stack.wait_effect(result.id)
    host, port = sentinel_stack.state.connection_pool.get_master_address()  # type: ignore[attr-defined]
    direct = redis.Redis(host=host, port=port)
    try:
        assert direct.hget(Keys.demo_effects(), result.id) == b"1"
    finally:
        direct.close()


def test_tls_state_client_verifies_the_server_certificate(tls_stack: Stack) -> None:
    without_ca = tls_stack.url.split("&ssl_ca_certs=", 1)[0]  # system CAs only
    for spelling in ("CERT_REQUIRED", "required"):
        client = connect(without_ca.replace("CERT_REQUIRED", spelling))
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            client.ping()
        client.close()
