"""The worker side: the ``pipeline.handle`` task, one attempt per delivery and its
ledger, batches, breakers, the retry schedule, the reliable fetch and per-process wiring.
"""
