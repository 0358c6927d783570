"""The Celery task messages the pipeline sends: ids, protocol headers and rendering,
the same for the producer, the worker, retries, replay and batches.
"""
