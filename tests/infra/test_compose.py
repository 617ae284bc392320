"""The production compose file and images: what an operator relies on when starting the stack."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The parsed docker-compose.yml."""
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_stack_has_every_service(compose: dict[str, Any]) -> None:
    """postgres, redis, minio + bucket, migrate, api, workers and beat are all declared."""
    assert {
        "postgres",
        "redis",
        "minio",
        "create-bucket",
        "migrate",
        "api",
        "worker",
        "beat",
        "worker-gpu",
    } <= set(compose["services"])


def test_datastores_have_healthchecks(compose: dict[str, Any]) -> None:
    """Dependents wait on real readiness, not on container start."""
    services = compose["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "ping" in services["redis"]["healthcheck"]["test"]
    assert services["minio"]["healthcheck"]["test"]


def test_migrate_runs_once_before_api_and_workers(compose: dict[str, Any]) -> None:
    """The schema is upgraded by a one-shot job; api and workers start only after it succeeds."""
    services = compose["services"]
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "worker-gpu"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["create-bucket"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
    assert services["create-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_gpu_worker_is_opt_in_with_an_nvidia_reservation(compose: dict[str, Any]) -> None:
    """`docker compose up` never needs a GPU; `--profile gpu` adds a worker that reserves one."""
    gpu = compose["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert all("profiles" not in s for n, s in compose["services"].items() if n != "worker-gpu")


def test_services_share_one_production_configuration(compose: dict[str, Any]) -> None:
    """api and workers read the same LIVERSCAN_* settings: PostgreSQL, Redis and S3 (MinIO)."""
    services = compose["services"]
    env = services["api"]["environment"]
    assert env["LIVERSCAN_ENV"] == "production"
    assert env["LIVERSCAN_DATABASE_URL"].startswith("postgresql")
    assert env["LIVERSCAN_BROKER_URL"].startswith("redis://redis:6379")
    assert env["LIVERSCAN_S3_ENDPOINT_URL"] == "http://minio:9000"
    for name in ("migrate", "worker", "beat", "worker-gpu"):
        assert services[name]["environment"] == env


def test_api_image_has_no_tensorflow_and_workers_do() -> None:
    """The api image installs the base package only; the CPU worker installs the ml extra."""
    api = (ROOT / "infra" / "Dockerfile.api").read_text()
    worker = (ROOT / "infra" / "Dockerfile.worker").read_text()
    gpu = (ROOT / "infra" / "Dockerfile.worker-gpu").read_text()
    assert "RUN pip install . " in api or "RUN pip install .\n" in api
    assert (
        "[ml]" not in api
        and "tensorflow" not in api.split("RUN pip install")[1].split("find_spec")[0]
    )
    assert 'pip install ".[ml]"' in worker
    assert gpu.startswith("#") and "FROM tensorflow/tensorflow:" in gpu and "-gpu" in gpu


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="the docker compose plugin is not installed here",
)
def test_docker_compose_config_accepts_the_file() -> None:
    """`docker compose config` validates the file where the plugin exists."""
    env = {
        "POSTGRES_PASSWORD": "x",
        "MINIO_ROOT_USER": "x",
        "MINIO_ROOT_PASSWORD": "xxxxxxxx",
        "LIVERSCAN_JWT_SECRET_KEY": "x",
        "LIVERSCAN_SECRETS_KEY": "x",
        "PATH": "/usr/bin:/bin:/usr/local/bin",
    }
    result = subprocess.run(
        ["docker", "compose", "config", "-q"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_kubernetes_workers_scale_on_inference_queue_depth() -> None:
    """KEDA scales the CPU inference deployment on the Redis list the API enqueues to."""
    docs = list(yaml.safe_load_all((ROOT / "infra" / "k8s" / "worker.yaml").read_text()))
    by_kind_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    scaled = by_kind_name[("ScaledObject", "liverscan-worker")]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "liverscan-worker"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == "inference"
    worker = by_kind_name[("Deployment", "liverscan-worker")]["spec"]["template"]["spec"]
    command = worker["containers"][0]["command"]
    assert "--queues=inference" in command and "--concurrency=1" not in command  # threads pool
    env = {e["name"]: e["value"] for e in worker["containers"][0]["env"]}
    assert env["LIVERSCAN_WORKER_POOL"] == "threads" and int(env["LIVERSCAN_WORKER_BATCH_SIZE"]) > 1
    beat = by_kind_name[("Deployment", "liverscan-beat")]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"
