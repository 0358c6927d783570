"""Redis keys the isolation benchmark's handlers write (no imports: the stock
worker must not load the pipeline)."""

STARTED_KEY = "bench:critical:started"  # hash: event id -> handler start (epoch s)
BULK_DONE_KEY = "bench:bulk:done"  # counter: bulk events handled
STARTS_KEY = "bench:started:count"  # hash: event id -> handler starts (latency scenario)
