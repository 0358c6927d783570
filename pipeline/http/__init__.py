"""The HTTP surfaces of ``pipeline serve``: the ingest API, the DLQ routes, webhooks and
the DLQ console.
"""
