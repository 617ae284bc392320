"""The one typed settings object; nothing else in the codebase reads the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values shipped in .env.example: a production process refuses to start with any of them.
EXAMPLE_SECRETS = frozenset(
    {
        "",
        "change-me",
        "change-me-to-a-long-random-string",
        "dev-insecure-jwt-secret-change-me",
        "dev-insecure-secrets-key-change-me",
        "minioadmin",
        "example",
    }
)


class ConfigError(RuntimeError):
    """Raised at startup when the settings are unusable (e.g. a production secret is missing)."""


class Settings(BaseSettings):
    """Every tunable of liverscan, read from `LIVERSCAN_*` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix="LIVERSCAN_", extra="ignore", env_file=None, env_ignore_empty=True
    )

    env: Literal["development", "test", "production"] = "development"
    data_dir: Path = Path("./var")

    database_url: str = ""  # default: sqlite:///<data_dir>/liverscan.db
    # Connections one process keeps to a server database (PostgreSQL), opened as needed and then
    # kept: threads beyond it wait for one (30 s). Size PostgreSQL's max_connections for
    # (API processes + worker processes at full scale) x this.
    db_pool_size: int = Field(default=15, ge=1, le=1000)
    broker_url: str = ""  # default: sqla+sqlite:///<data_dir>/broker.sqlite (no server needed)
    result_backend: str | None = None  # the job row is the result; Celery results are not used

    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path | None = None  # default: <data_dir>/store
    s3_bucket: str = "liverscan"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    presign_expires_s: int = Field(default=900, ge=1, le=7 * 24 * 3600)
    # A direct-to-store upload (POST /api/v1/uploads) must become a job within this; the sweep
    # then expires it and deletes whatever bytes arrived.
    upload_expires_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    # Days past its deadline that a finished upload's row (swept: its key deleted a last time) is
    # kept, so a retry of the request that made a job from it still replays that job; then the
    # sweep deletes the row. 0 = keep forever.
    upload_slot_retention_days: int = Field(default=30, ge=0)

    jwt_secret_key: str = "dev-insecure-jwt-secret-change-me"
    # Encrypts secrets stored in the database (webhook signing secrets; api/domain/secrets.py).
    # Rotation: set a new key and move the old one here (comma-separated); the sweep re-seals.
    secrets_key: str = "dev-insecure-secrets-key-change-me"
    secrets_key_previous: str = ""
    jwt_cookie_secure: bool = False
    access_token_minutes: int = Field(default=15, ge=1)
    refresh_token_days: int = Field(default=30, ge=1)

    # argon2id cost; lower only in tests (hashing dominates their runtime).
    password_hash_time_cost: int = Field(default=3, ge=1)
    password_hash_memory_kib: int = Field(default=65536, ge=1024)

    max_upload_mb: int = Field(default=50, ge=1)
    # Batches (issue 6): files per batch, one request's size, zip-bomb ratio cap.
    batch_max_files: int = Field(default=2000, ge=1)
    batch_max_mb: int = Field(default=1024, ge=1)
    zip_max_ratio: int = Field(default=100, ge=1)

    webhook_allow_private: bool = False
    webhook_max_attempts: int = Field(default=8, ge=1)
    webhook_backoff_base_s: float = Field(default=30.0, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0)

    sweep_deadline_s: int = Field(default=900, ge=1)
    sweep_interval_s: int = Field(default=60, ge=1)
    visibility_timeout_s: int = Field(default=3600, ge=60)

    model_path: Path | None = None  # default: ml_core's shipped model

    # Inference workers (issue 6, docs/operations.md). The `threads` pool runs `worker_concurrency`
    # jobs side by side in one process; their content-gate and model calls are gathered into one
    # batched call of at most `worker_batch_size` slices, waiting at most `worker_batch_wait_ms`
    # for batch-mates. `prefork`/`solo` keep one job per process (batches of one).
    worker_pool: Literal["threads", "prefork", "solo"] = "threads"
    worker_batch_size: int = Field(default=16, ge=1, le=1024)
    worker_batch_wait_ms: int = Field(default=50, ge=0, le=60_000)
    worker_concurrency: int | None = Field(default=None, ge=1)  # default: 2 x batch (threads)
    device: Literal["cpu", "gpu", "auto"] = "auto"  # where the model runs; gpu: fail without one
    # What runs the classifier's, localiser's and gate's forwards (ml_core Classifier.load runtime):
    # "onnx" ONNX Runtime on the artifact's verified exports (fail without them), "tf" TensorFlow,
    # "auto" ONNX Runtime per part when it is installed, the artifact ships that export and the
    # device is the CPU.
    model_runtime: Literal["auto", "tf", "onnx"] = "auto"
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)  # worker /metrics; 0 = off
    # Load the model when a worker process starts (off for webhook/report-only workers, which
    # never classify: saves ~0.7 GB per process).
    worker_preload_model: bool = True
    # GET of a job's report renders it on first request (a `reports` worker task); the request
    # waits this long for it before answering 202 with Retry-After.
    report_wait_s: float = Field(default=20.0, ge=0)

    cors_origins: list[str] = Field(default_factory=list)  # empty = CORS off
    # Reverse proxies in front of the API that append the client to X-Forwarded-For (werkzeug's
    # ProxyFix x_for): the client address the rate limits and the lockout see is the one that
    # many hops from the right; links take the scheme in X-Forwarded-Proto (its last value, set by
    # the nearest proxy). 0 = the connection's peer and scheme, both headers ignored (a client
    # could write anything there). Set it only when every request reaches the API through the
    # proxies.
    trusted_proxy_hops: int = Field(default=0, ge=0, le=10)
    # The names clients reach the API by, comma-separated (host or host:port; the port is not
    # compared, a leading dot admits subdomains). Links are built on the request's Host, so a
    # request naming another host is refused (400 bad_host). Empty = any Host (links take it).
    public_hosts: str = ""
    # Bearer token Prometheus must send for the API's /metrics (Authorization: Bearer <token>).
    # Empty = /metrics is public: restrict it at the ingress to the scraper's network instead.
    metrics_token: str = ""
    hsts: bool | None = None  # Strict-Transport-Security; default: on when jwt_cookie_secure

    # Rate limits (flask-limiter syntax, per client address; submit per user). None = on, except
    # with env=test, where suites that sign up many users opt in explicitly.
    rate_limit_enabled: bool | None = None
    rate_limit_storage_url: str = ""  # default: the broker if Redis, else memory:// (one process)
    rate_limit_login: str = "10/minute,100/hour"
    rate_limit_signup: str = "5/minute,50/hour"
    rate_limit_submit: str = "120/minute"
    # Failed logins before a lockout, counted per email from unfamiliar addresses and per familiar
    # address (one of the user's last sign-in addresses); each further failure doubles it (≤ a day).
    login_max_failures: int = Field(default=5, ge=1)
    login_lockout_s: int = Field(default=900, ge=1)
    # An address stays familiar this many days after its last successful sign-in; then it is
    # counted like any other once a lock of its own has ended (and the sweep forgets it).
    login_familiar_days: int = Field(default=90, ge=1, le=3650)

    # Days after a job finishes before the sweep deletes its upload and artifacts; 0 = keep.
    retention_days: int = Field(default=0, ge=0)
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _fill_defaults_and_check(self) -> Settings:
        data_dir = self.data_dir
        if not self.database_url:
            self.database_url = f"sqlite:///{(data_dir / 'liverscan.db').as_posix()}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{(data_dir / 'broker.sqlite').as_posix()}"
        if self.storage_dir is None:
            self.storage_dir = data_dir / "store"
        if self.env == "production":
            self._check_production_secrets()
        return self

    def _check_production_secrets(self) -> None:
        missing: list[str] = []
        if self.jwt_secret_key in EXAMPLE_SECRETS or len(self.jwt_secret_key) < 32:
            missing.append("LIVERSCAN_JWT_SECRET_KEY (at least 32 characters, not the example)")
        if self.secrets_key in EXAMPLE_SECRETS or len(self.secrets_key) < 32:
            missing.append("LIVERSCAN_SECRETS_KEY (at least 32 characters, not the example)")
        if self.storage_backend == "s3":
            for name in ("aws_access_key_id", "aws_secret_access_key"):
                value = getattr(self, name)
                if value is None or value in EXAMPLE_SECRETS:
                    missing.append(f"LIVERSCAN_{name.upper()}")
        if missing:
            raise ConfigError("production settings are missing secrets: " + ", ".join(missing))

    @property
    def max_upload_bytes(self) -> int:
        """The upload size limit in bytes."""
        return self.max_upload_mb * 1024 * 1024

    @property
    def rate_limits_on(self) -> bool:
        """Whether rate limits apply (explicit setting, else on outside env=test)."""
        if self.rate_limit_enabled is not None:
            return self.rate_limit_enabled
        return self.env != "test"

    @property
    def rate_limit_storage(self) -> str:
        """The flask-limiter storage URI: explicit, else the Redis broker, else memory."""
        if self.rate_limit_storage_url:
            return self.rate_limit_storage_url
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return "memory://"

    @property
    def hsts_on(self) -> bool:
        """Whether to send Strict-Transport-Security (explicit, else when cookies are TLS-only)."""
        return self.jwt_cookie_secure if self.hsts is None else self.hsts

    @property
    def secrets_keys_previous(self) -> tuple[str, ...]:
        """Older keys that still decrypt stored secrets (LIVERSCAN_SECRETS_KEY_PREVIOUS)."""
        return tuple(k.strip() for k in self.secrets_key_previous.split(",") if k.strip())

    @property
    def public_host_names(self) -> tuple[str, ...]:
        """The names in LIVERSCAN_PUBLIC_HOSTS, lower-cased; empty = every Host is served."""
        return tuple(h.strip().lower() for h in self.public_hosts.split(",") if h.strip())

    @property
    def worker_threads(self) -> int:
        """Jobs one worker process runs side by side (threads pool: 2 x batch, so one batch
        is assembled while the previous one is in the model)."""
        if self.worker_concurrency is not None:
            return self.worker_concurrency
        return 2 * self.worker_batch_size if self.worker_pool == "threads" else 1

    @property
    def is_sqlite(self) -> bool:
        """Whether the database is a SQLite file."""
        return self.database_url.startswith("sqlite")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
