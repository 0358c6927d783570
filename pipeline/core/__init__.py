"""The core: the event envelope, tiers and classification, retry decisions, admission,
redaction, handlers and the Redis key names. Pure logic where it can be; imports nothing
else of the pipeline but :mod:`pipeline.errors`.
"""
