"""Publishing: validate, classify, admit, claim and enqueue events
(:func:`pipeline.publish`, :func:`pipeline.publish_many`).
"""
