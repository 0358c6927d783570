"""Names other processes rely on: the Celery task names of the pipeline's messages.

Workers look tasks up by these names; renaming one strands every message already queued
under the old name.
"""

__all__ = ["BATCH_TASK_NAME", "TASK_NAME"]

TASK_NAME = "pipeline.handle"  # one (event, handler) per message
BATCH_TASK_NAME = "pipeline.handle_batch"  # many events of one handler per message
