"""LIVERSCAN_DEVICE and the micro-batching settings an operator sets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.domain.settings import Settings
from ml_core.errors import ModelLoadError
from worker import device
from worker.celery_app import make_celery


def test_device_choice() -> None:
    """cpu hides GPUs; gpu takes exactly one (one process per GPU) or refuses to start; auto
    takes one GPU when there is one, else the CPU."""
    gpus = ["GPU:0", "GPU:1"]
    assert device.plan("cpu", gpus) == ("cpu", [])
    assert device.plan("gpu", gpus) == ("gpu", ["GPU:0"])
    assert device.plan("auto", gpus) == ("gpu", ["GPU:0"])
    assert device.plan("auto", []) == ("cpu", [])
    with pytest.raises(ModelLoadError):
        device.plan("gpu", [])


def test_settings_reject_an_unknown_device_and_an_empty_batch() -> None:
    """LIVERSCAN_DEVICE=tpu or a batch size of 0 fail at startup, not at the first job."""
    with pytest.raises(ValidationError):
        Settings(device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Settings(worker_batch_size=0)


def test_the_worker_pool_follows_the_settings(tmp_path) -> None:
    """threads pool with two batches in flight by default; an explicit concurrency wins; prefork
    keeps one job per process."""
    app = make_celery(Settings(data_dir=tmp_path, worker_batch_size=8))
    assert app.conf.worker_pool == "threads" and app.conf.worker_concurrency == 16
    app = make_celery(Settings(data_dir=tmp_path, worker_batch_size=8, worker_concurrency=10))
    assert app.conf.worker_concurrency == 10
    app = make_celery(Settings(data_dir=tmp_path, worker_pool="prefork"))
    assert app.conf.worker_pool == "prefork" and app.conf.worker_concurrency == 1
    assert app.conf.task_acks_late is True and app.conf.worker_prefetch_multiplier == 1


def test_every_dashboard_series_is_exported(settings: Settings, broker) -> None:
    """Each metric the Grafana dashboard charts or an alert rule watches is served by the API's or
    a worker's /metrics, no name is served by both, the k8s PrometheusRule holds the same alerts
    as infra/monitoring/alerts.yml, and the API exports the depth of every queue (inference,
    webhooks, reports)."""
    import json
    import re
    from pathlib import Path

    import yaml
    from prometheus_client import REGISTRY, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from api.app import create_app
    from worker import metrics  # noqa: F401 (registers the worker's metrics)

    app = create_app(settings.model_copy(update={"jwt_secret_key": "scale-" + "m" * 40}))
    api_text = app.test_client().get("/metrics").get_data(as_text=True)
    worker_text = generate_latest(REGISTRY).decode()
    exported = api_text + worker_text
    dashboard = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "liverscan.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    alerts = yaml.safe_load((dashboard.parents[1] / "monitoring" / "alerts.yml").read_text())
    exprs += [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    rules = [
        d
        for d in yaml.safe_load_all((dashboard.parents[1] / "k8s" / "monitoring.yaml").read_text())
        if d["kind"] == "PrometheusRule"
    ]
    assert [g for r in rules for g in r["spec"]["groups"]] == alerts["groups"]  # the same alerts
    names = {n for e in exprs for n in re.findall(r"liverscan_[a-z_]+", e)}
    assert names
    families = {f.name for f in text_string_to_metric_families(exported)}
    # One name, one meaning: a worker gauge named like an API series would mix into the same
    # max()/sum() of every scraped target (a stale worker count keeping an alert firing).
    api_names = {f.name for f in text_string_to_metric_families(api_text)}
    worker_names = {f.name for f in text_string_to_metric_families(worker_text)}
    assert {n for n in api_names & worker_names if n.startswith("liverscan_")} == set()
    for name in names:  # a histogram's _bucket/_sum/_count, a counter's _total, an info's _info
        base = re.sub(r"_(bucket|sum|count|total|info)$", "", name)
        assert name in families or base in families, name
    for queue in ("inference", "webhooks", "reports"):
        assert f'liverscan_queue_depth{{queue="{queue}"}}' in api_text


def test_model_runtime_setting() -> None:
    """LIVERSCAN_MODEL_RUNTIME: auto (default) | tf | onnx, anything else fails at startup; "auto"
    on a GPU worker is TensorFlow (ONNX Runtime runs on the CPU here)."""
    from worker.model_cache import model_runtime

    assert Settings().model_runtime == "auto"
    with pytest.raises(ValidationError):
        Settings(model_runtime="torch")  # type: ignore[arg-type]
    assert model_runtime("auto", "cpu") == "auto"
    assert model_runtime("auto", "gpu") == "tf"
    assert model_runtime("onnx", "gpu") == "onnx" and model_runtime("tf", "cpu") == "tf"
