"""The object-store port: a local folder or S3 (MinIO, moto) behind one small protocol."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

import boto3
from botocore.client import Config
from botocore.exceptions import BotoCoreError, ClientError

from api.domain.errors import InvalidKey, ObjectNotFound, PayloadTooLarge, StorageUnavailable
from api.domain.settings import Settings

log = logging.getLogger(__name__)

# Keys are "/"-separated segments of safe characters; no segment may start with a dot, so
# "..", hidden files and absolute paths are impossible by construction.
_KEY_RE = re.compile(
    r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}){0,7}$"
)


@dataclass(frozen=True)
class StoredObject:
    """What the store holds under a key."""

    key: str
    size: int
    sha256: str
    content_type: str


def check_key(key: str) -> str:
    """Return `key` if it is a safe storage key, else raise InvalidKey."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise InvalidKey(details={"key": str(key)[:200]})
    return key


# Objects the worker derives for DICOM uploads; they have no column on the job row, so retention
# and deletion find them by these names.
DICOM_OVERLAY_NAME = "overlay_sc.dcm"
DICOM_SR_NAME = "sr.dcm"
# The other objects the worker stores under fixed names. A run or a render stores them before it
# records them on the row, so one interrupted in between leaves objects no column points at:
# retention and deletion look for these names too.
HEATMAP_NAME = "heatmap.png"
OVERLAY_NAME = "overlay.png"
REPORT_PDF_NAME = "report.pdf"


def upload_key(org_id: UUID, upload_id: UUID) -> str:
    """Where a direct-to-store upload's bytes go: "<org>/uploads/<upload id>"."""
    return f"{org_id}/uploads/{upload_id}"


def job_key(org_id: UUID, job_id: UUID, name: str) -> str:
    """The key of one object of a job, e.g. "<org>/<job>/input" or "<org>/<job>/overlay.png"."""
    return check_key(f"{org_id}/{job_id}/{name}")


class Storage(Protocol):
    """Where uploads and artifacts live."""

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject: ...

    def get(self, key: str, max_bytes: int | None = None) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def url_for(self, key: str, expires_s: int = 900) -> str | None: ...

    def upload_url_for(self, key: str, content_type: str, expires_s: int = 900) -> str | None: ...

    def size(self, key: str) -> int | None: ...

    def ping(self) -> None: ...


def _within(data: bytes, max_bytes: int | None) -> bytes:
    """`data` (read with at most one byte beyond `max_bytes`), or payload_too_large."""
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadTooLarge(details={"max_bytes": max_bytes})
    return data


def _stored(key: str, data: bytes, content_type: str) -> StoredObject:
    return StoredObject(
        key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest(), content_type=content_type
    )


def _unreachable(exc: Exception) -> StorageUnavailable:
    """The outage a failing S3 call means (botocore's error, or an answer other than not-found)."""
    return StorageUnavailable(details={"reason": str(exc)[:200]})


def _disk_fault(exc: OSError) -> StorageUnavailable:
    """The outage a failing disk call means (a folder not writable, a file where the store needs a
    folder, a full or read-only volume): the error S3 raises when it cannot be reached. The reason
    names the error, never the path."""
    reason = type(exc).__name__ + (f": {exc.strerror}" if exc.strerror else "")
    return StorageUnavailable(details={"reason": reason[:200]})


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalStorage:
    """A folder on disk; `url_for` is None, so the API serves objects through an authenticated route.

    Disk errors are StorageUnavailable, as S3's are; only a missing file (or a folder, which holds
    no object, under the key) means that no object is stored there.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):  # defence in depth against symlinks
            raise InvalidKey(details={"key": key})
        return path

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """Write `data` atomically under `key`."""
        path = self._path(key)
        try:
            _write_atomically(path, data)
        except OSError as exc:
            raise _disk_fault(exc) from exc
        return _stored(key, data, content_type)

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """Read the bytes under `key` (ObjectNotFound if absent, PayloadTooLarge past `max_bytes`)."""
        path = self._path(key)
        try:
            with path.open("rb") as fh:
                data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise ObjectNotFound(details={"key": key}) from exc
        except OSError as exc:
            raise _disk_fault(exc) from exc
        return _within(data, max_bytes)

    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""
        return self.size(key) is not None

    def delete(self, key: str) -> None:
        """Remove the object under `key`; absent keys are fine."""
        try:
            self._path(key).unlink(missing_ok=True)
        except IsADirectoryError:  # a folder holds no object under its own key (as in get)
            return
        except OSError as exc:
            raise _disk_fault(exc) from exc

    def url_for(self, key: str, expires_s: int = 900) -> str | None:
        """No direct URL for a local folder: the API serves it with authentication."""
        check_key(key)
        return None

    def upload_url_for(self, key: str, content_type: str, expires_s: int = 900) -> str | None:
        """No direct upload URL for a local folder: the API takes the bytes (PUT /uploads/<id>)."""
        check_key(key)
        return None

    def size(self, key: str) -> int | None:
        """Bytes stored under `key`, or None when nothing is."""
        try:
            found = self._path(key).stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _disk_fault(exc) from exc
        return found.st_size if stat.S_ISREG(found.st_mode) else None

    def ping(self) -> None:
        """Raise StorageUnavailable unless the folder is writable."""
        if not (self.root.is_dir() and os.access(self.root, os.W_OK)):
            raise StorageUnavailable(details={"root": str(self.root)})


#: botocore's default connection pool size; a client shared by more threads needs more.
S3_MIN_CONNECTIONS = 10


class S3Storage:
    """An S3 bucket through boto3; `endpoint_url` points at MinIO or moto when set.

    `max_connections` should be at least the number of threads sharing the client: beyond the
    pool's size, urllib3 opens a new connection per request and throws it away afterwards.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        max_connections: int = S3_MIN_CONNECTIONS,
    ) -> None:
        self.bucket = bucket
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=5,
                read_timeout=30,
                retries={"max_attempts": 3, "mode": "standard"},
                max_pool_connections=max_connections,
            ),
        )

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (development and tests)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """Upload `data` under `key`."""
        check_key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except (BotoCoreError, ClientError) as exc:
            raise _unreachable(exc) from exc
        return _stored(key, data, content_type)

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """Download the bytes under `key` (ObjectNotFound if absent, PayloadTooLarge past
        `max_bytes`: then no more than one byte beyond it is read)."""
        check_key(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"}:
                raise ObjectNotFound(details={"key": key}) from exc
            raise _unreachable(exc) from exc
        except BotoCoreError as exc:
            raise _unreachable(exc) from exc
        stream = response["Body"]
        try:
            body: bytes = stream.read() if max_bytes is None else stream.read(max_bytes + 1)
        finally:
            stream.close()  # a bounded read may leave the rest unread: drop the connection
        return _within(body, max_bytes)

    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""
        return self.size(key) is not None

    def delete(self, key: str) -> None:
        """Remove the object under `key`; absent keys are fine."""
        check_key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise _unreachable(exc) from exc

    def url_for(self, key: str, expires_s: int = 900) -> str | None:
        """A presigned GET URL valid for `expires_s` seconds."""
        check_key(key)
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s
        )
        return url

    def upload_url_for(self, key: str, content_type: str, expires_s: int = 900) -> str | None:
        """A presigned PUT URL for `key` valid for `expires_s` seconds (send that Content-Type)."""
        check_key(key)
        url: str = self.client.generate_presigned_url(
            "put_object",
            Params={"Bucket": self.bucket, "Key": key, "ContentType": content_type},
            ExpiresIn=expires_s,
        )
        return url

    def size(self, key: str) -> int | None:
        """Bytes stored under `key`, or None when nothing is."""
        check_key(key)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"}:
                return None
            raise _unreachable(exc) from exc
        except BotoCoreError as exc:
            raise _unreachable(exc) from exc
        return int(head["ContentLength"])

    def ping(self) -> None:
        """Raise StorageUnavailable unless the bucket answers."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise _unreachable(exc) from exc


def make_storage(settings: Settings) -> Storage:
    """The store selected by `settings.storage_backend`."""
    if settings.storage_backend == "s3":
        return S3Storage(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.aws_access_key_id,
            secret_access_key=settings.aws_secret_access_key,
            # one connection per worker thread (the API's waitress threads are fewer)
            max_connections=max(S3_MIN_CONNECTIONS, settings.worker_threads),
        )
    assert settings.storage_dir is not None  # filled by Settings
    return LocalStorage(settings.storage_dir)
