"""Benchmarks: each scenario starts its own broker and measures both sides in one run.

* ``python -m bench <scenario>`` (:mod:`bench.__main__`) runs
  ``bench.scenarios.<scenario>.main``: one module per scenario under
  :mod:`bench.scenarios`.
* Shared by the scenarios: :mod:`bench.common` (own broker, workers, /proc, results),
  :mod:`bench.charts` (each scenario's PNG), :mod:`bench.alerts` (which alert rules a
  run's scrapes would have fired).
* Loaded by the scenarios' workers and subprocesses, by name: :mod:`bench.handlers`
  and its stock Celery twin :mod:`bench.stock_app` (with :mod:`bench.stock_client`,
  both writing :mod:`bench.keys`), :mod:`bench.io_handlers` and :mod:`bench.io_server`.
* A scenario's parts that do not fit its module: :mod:`bench.isolation_sides`,
  :mod:`bench.overhead_drain`, and the seed simulator, :mod:`bench.seed`.
"""
