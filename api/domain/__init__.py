"""Framework-free core shared by the API and the worker (no Flask, Celery or TensorFlow)."""
