"""The storage port: one suite, run against the local folder and S3 over HTTP (moto's server)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from api.domain.errors import InvalidKey, ObjectNotFound, PayloadTooLarge, StorageUnavailable
from api.domain.settings import Settings
from api.domain.storage import LocalStorage, S3Storage, Storage, job_key, make_storage
from tests.api.conftest import read_only_folder


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """A fresh, empty store of each kind."""
    if request.param == "local":
        yield LocalStorage(tmp_path / "store")
        return
    endpoint = request.getfixturevalue("s3_endpoint")
    s3 = S3Storage(
        f"test-{uuid.uuid4().hex[:12]}",
        endpoint_url=endpoint,
        access_key_id="testing",
        secret_access_key="testing",
    )
    s3.ensure_bucket()
    yield s3


def test_put_get_roundtrip_with_sha256(store: Storage) -> None:
    data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 100
    key = job_key(uuid.uuid4(), uuid.uuid4(), "input")
    stored = store.put(key, data, "image/png")
    assert stored.key == key
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert store.get(key) == data
    assert store.exists(key)


def test_overwrite_replaces_content(store: Storage) -> None:
    store.put("org/job/overlay.png", b"one", "image/png")
    store.put("org/job/overlay.png", b"two", "image/png")
    assert store.get("org/job/overlay.png") == b"two"


def test_missing_key_is_object_not_found(store: Storage) -> None:
    assert not store.exists("org/job/nothing")
    with pytest.raises(ObjectNotFound) as info:
        store.get("org/job/nothing")
    assert info.value.code == "object_not_found"


def test_a_bounded_get_refuses_more_bytes_than_allowed(store: Storage) -> None:
    """`max_bytes` bounds what is read: exactly the limit comes back, one byte more is
    payload_too_large, and an absent key is still object_not_found."""
    store.put("org/upload/slice", b"x" * 100, "image/png")
    assert store.get("org/upload/slice", max_bytes=100) == b"x" * 100
    with pytest.raises(PayloadTooLarge) as info:
        store.get("org/upload/slice", max_bytes=99)
    assert info.value.code == "payload_too_large"
    with pytest.raises(ObjectNotFound):
        store.get("org/upload/nothing", max_bytes=99)


def test_delete_is_idempotent(store: Storage) -> None:
    store.put("org/job/input", b"x", "application/octet-stream")
    store.delete("org/job/input")
    store.delete("org/job/input")
    assert not store.exists("org/job/input")


@pytest.mark.parametrize(
    "key",
    [
        "../etc/passwd",
        "/abs/path",
        "org/../../x",
        "org//job",
        ".hidden/x",
        "org/job/",
        "",
        "a\\b",
        "org/job/\x00",
    ],
)
def test_unsafe_keys_are_refused(store: Storage, key: str) -> None:
    with pytest.raises(InvalidKey) as info:
        store.put(key, b"x", "text/plain")
    assert info.value.code == "invalid_key"
    with pytest.raises(InvalidKey):
        store.get(key)


def test_ping_answers(store: Storage) -> None:
    store.ping()


def test_url_for_is_presigned_on_s3_and_none_locally(store: Storage) -> None:
    store.put("org/job/heatmap.png", b"\x89PNG-heat", "image/png")
    url = store.url_for("org/job/heatmap.png", 60)
    if isinstance(store, LocalStorage):
        assert url is None
        return
    assert url is not None and "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url
    r = requests.get(url, timeout=10)
    assert r.status_code == 200
    assert r.content == b"\x89PNG-heat"
    assert r.headers["Content-Type"] == "image/png"


def test_local_store_stays_inside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = LocalStorage(root)
    (tmp_path / "outside").mkdir()
    (root / "org").mkdir(parents=True)
    (root / "org" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(InvalidKey):
        store.put("org/link/evil", b"x", "text/plain")
    assert not (tmp_path / "outside" / "evil").exists()


def test_s3_unreachable_is_storage_unavailable() -> None:
    store = S3Storage(
        "nope", endpoint_url="http://127.0.0.1:1", access_key_id="a", secret_access_key="b"
    )
    with pytest.raises(StorageUnavailable) as info:
        store.ping()
    assert info.value.code == "storage_unavailable"


STORE_CALLS = ["put", "get", "exists", "size", "delete"]


def _call(store: Storage, operation: str, key: str) -> object:
    """One store call by name on `key` (put stores one byte)."""
    args: dict[str, tuple[object, ...]] = {"put": (key, b"x", "image/png")}
    return getattr(store, operation)(*args.get(operation, (key,)))


@pytest.mark.parametrize("operation", STORE_CALLS)
def test_every_s3_call_to_an_unreachable_store_is_storage_unavailable(operation: str) -> None:
    """Callers (deletion, retention, the sweep) handle one error for an outage, whatever the call."""
    store = S3Storage(
        "nope", endpoint_url="http://127.0.0.1:1", access_key_id="a", secret_access_key="b"
    )
    with pytest.raises(StorageUnavailable):
        _call(store, operation, "org/job/input")


@pytest.mark.parametrize("operation", STORE_CALLS)
@pytest.mark.parametrize("where", ["root", "org"])
def test_every_local_call_to_a_broken_folder_is_storage_unavailable(
    tmp_path: Path, operation: str, where: str
) -> None:
    """A file where the store needs a folder (its root, e.g. a volume not mounted, or an org's
    folder) is the same outage as an unreachable S3, not an absent object or a 500."""
    store = LocalStorage(tmp_path / "store")
    broken = store.root if where == "root" else store.root / "org"
    if broken.exists():
        broken.rmdir()
    broken.write_bytes(b"not a folder")
    with pytest.raises(StorageUnavailable) as info:
        _call(store, operation, "org/job/input")
    assert info.value.code == "storage_unavailable"


def test_local_writes_to_a_read_only_folder_are_storage_unavailable(tmp_path: Path) -> None:
    """A folder the process may not write (a read-only volume, files of another owner): put and
    delete answer storage_unavailable; what is there can still be read."""
    store = LocalStorage(tmp_path / "store")
    store.put("org/job/input", b"kept", "image/png")
    with read_only_folder(store.root / "org" / "job"):
        with pytest.raises(StorageUnavailable) as refused_put:
            store.put("org/job/overlay.png", b"x", "image/png")
        assert refused_put.value.code == "storage_unavailable"
        with pytest.raises(StorageUnavailable) as refused_delete:
            store.delete("org/job/input")
        assert refused_delete.value.code == "storage_unavailable"
        assert store.get("org/job/input") == b"kept"
        assert store.exists("org/job/input") and store.size("org/job/input") == 4
        assert not store.exists("org/job/nothing")
        with pytest.raises(ObjectNotFound):
            store.get("org/job/nothing")
    store.delete("org/job/input")
    assert not store.exists("org/job/input")


def test_make_storage_follows_settings(tmp_path: Path, s3_endpoint: str) -> None:
    local = make_storage(Settings(env="test", data_dir=tmp_path))
    assert isinstance(local, LocalStorage) and local.root == (tmp_path / "store").resolve()
    s3 = make_storage(
        Settings(
            env="test",
            data_dir=tmp_path,
            storage_backend="s3",
            s3_bucket="b1",
            s3_endpoint_url=s3_endpoint,
            aws_access_key_id="a",
            aws_secret_access_key="b",
        )
    )
    assert isinstance(s3, S3Storage) and s3.bucket == "b1"


def test_s3_store_keeps_a_connection_per_worker_thread(
    tmp_path: Path, s3_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker's threads (2 x batch = 32 by default) share one S3 client: none of them has its
    connection thrown away and a new one opened for every request (a new TLS handshake against a
    real store), which urllib3 reports as "Connection pool is full, discarding connection"."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    settings = Settings(
        env="test",
        data_dir=tmp_path,
        storage_backend="s3",
        s3_bucket=f"pool-{uuid.uuid4().hex[:12]}",
        s3_endpoint_url=s3_endpoint,
        aws_access_key_id="a",
        aws_secret_access_key="b",
    )
    assert settings.worker_threads == 32
    store = make_storage(settings)
    assert isinstance(store, S3Storage)
    store.ensure_bucket()
    payload = bytes(range(256)) * 64

    def put_get(i: int) -> bool:
        key = f"org/job-{i}/overlay.png"
        store.put(key, payload, "image/png")
        return store.get(key) == payload

    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        with ThreadPoolExecutor(settings.worker_threads) as pool:
            results = list(pool.map(put_get, range(8 * settings.worker_threads)))
    assert all(results)
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]
