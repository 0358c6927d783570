"""Watching the pipeline: Prometheus metrics and the exporter, broker gauges, worker
heartbeats, outcome counters, ``pipeline status`` and Flower.
"""
