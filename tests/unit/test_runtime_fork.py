"""A runtime shared through a fork is rebuilt in the child: a Redis connection or
a lock inherited from the parent must never be used by both processes."""

from __future__ import annotations

import os

from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.worker.runtime import Runtime


def test_a_forked_child_makes_its_own_clients_and_the_parent_keeps_its() -> None:
    settings = load_settings(None, broker_url="redis://127.0.0.1:1/0")  # never connected
    rt = Runtime(create_app(settings, main="fork-test"), settings)
    parent_state, parent_lock = rt.state, rt._lock
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it got new objects, then leave at once
        fresh = rt.state is not parent_state and rt._lock is not parent_lock
        again = rt.state is rt.state  # made once in the child too
        os.write(write_end, b"1" if fresh and again else b"0")
        os._exit(0)
    os.close(write_end)
    assert os.read(read_end, 1) == b"1"
    os.waitpid(pid, 0)
    os.close(read_end)
    assert rt.state is parent_state  # the parent's own are untouched
