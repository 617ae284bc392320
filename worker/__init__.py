"""The liverscan worker: Celery app, thin tasks, the job pipeline, webhook delivery and the sweep."""
