"""What an operator relies on from the Celery app: queues, late acks, prefetch 1, redelivery window."""

from __future__ import annotations

import kombu.transport.sqlalchemy

from api.domain.settings import Settings
from worker.celery_app import celery_app, make_celery


def test_tasks_are_routed_to_their_queues() -> None:
    """Model work and webhook delivery never wait behind each other's messages."""
    import worker.tasks  # noqa: F401 (registers the tasks)

    routes = celery_app.conf.task_routes
    assert routes["liverscan.process_job"] == {"queue": "inference"}
    assert routes["liverscan.deliver_webhook"] == {"queue": "webhooks"}
    assert routes["liverscan.sweep"] == {"queue": "webhooks"}
    assert {"liverscan.process_job", "liverscan.deliver_webhook", "liverscan.sweep"} <= set(
        celery_app.tasks
    )


def test_a_dying_worker_loses_no_job() -> None:
    """Acks after the task, one message prefetched, a redelivery window longer than any job."""
    app = make_celery(Settings(broker_url="redis://127.0.0.1:6379/0", visibility_timeout_s=7200))
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.broker_transport_options == {"visibility_timeout": 7200}


def test_embedded_broker_gets_no_engine_options_and_polls_fast(tmp_path) -> None:
    """The SQLAlchemy transport's options go to create_engine, so none are passed; polling is set on the class."""
    app = make_celery(Settings(data_dir=tmp_path))
    assert app.conf.broker_url.startswith("sqla+sqlite:///")
    assert app.conf.broker_transport_options == {}
    assert kombu.transport.sqlalchemy.Transport.polling_interval <= 0.5


def test_sweep_is_scheduled_by_beat() -> None:
    """Production beat runs the sweep every LIVERSCAN_SWEEP_INTERVAL_S."""
    app = make_celery(Settings(sweep_interval_s=45))
    (entry,) = app.conf.beat_schedule.values()
    assert entry == {"task": "liverscan.sweep", "schedule": 45.0}
