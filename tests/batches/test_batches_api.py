"""POST /api/v1/batches, GET /api/v1/batches/<id> and the results CSV, on PostgreSQL and SQLite."""

from __future__ import annotations

import csv
import io
import random
import struct
import uuid
import zipfile
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from werkzeug.datastructures import MultiDict

from api.domain import batches, jobs
from api.domain.errors import LiverscanError
from api.domain.models import Batch, Job, WebhookDelivery
from api.domain.settings import Settings
from api.domain.storage import Storage
from tests.api.conftest import bearer, login, png_bytes, signup


def post_batch(
    client: FlaskClient,
    headers: dict[str, str],
    files: list[tuple[bytes, str]],
    **fields: Any,
) -> Any:
    """POST the files as `file` parts (plus form fields) to /api/v1/batches."""
    form: list[tuple[str, Any]] = [
        ("file", (io.BytesIO(data), name, "application/octet-stream")) for data, name in files
    ]
    for key, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            form.append((key, item))
    return client.post(
        "/api/v1/batches",
        headers=headers,
        data=MultiDict(form),
        content_type="multipart/form-data",
    )


def make_zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip archive in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def error_code(response: Any) -> str:
    """The `error.code` of an error envelope."""
    return str(response.get_json()["error"]["code"])


def batch_count(session: Session) -> int:
    """How many batches exist in the test's transaction."""
    return int(session.scalar(select(func.count()).select_from(Batch)) or 0)


def finish(session: Session, job_id: uuid.UUID, *, label: str | None, storage: Storage) -> None:
    """Drive a job to succeeded (label given) or rejected, as the worker would, with its batch hook."""
    job = session.get(Job, job_id)
    assert job is not None
    jobs.mark_processing(session, job_id)
    if label is None:
        jobs.mark_rejected(
            session,
            job_id,
            reason_code="not_liver_ct",
            validation={"passed": False, "reason_code": "not_liver_ct", "checks": []},
            input_meta=None,
        )
    else:
        overlay_key = f"{job.org_id}/{job.id}/overlay.png"
        storage.put(overlay_key, png_bytes(size=16), "image/png")
        jobs.mark_succeeded(
            session,
            job_id,
            label=label,
            probability=0.87,
            threshold=0.5,
            model_name="liverscan-lite0",
            model_version="0.1.0",
            model_sha256="cd" * 32,
            heatmap_key=overlay_key,
            overlay_key=overlay_key,
            validation={"passed": True, "reason_code": None, "checks": []},
            input_meta={"format": "png", "width": 16, "height": 16, "modality": None},
        )
    batches.on_job_terminal(session, job.batch_id)
    session.commit()


def test_many_file_parts_become_queued_jobs_of_one_batch(
    client: FlaskClient,
    user_headers: dict[str, str],
    session: Session,
    storage: Storage,
    broker: redis.Redis,
) -> None:
    files = [(png_bytes(seed=i), f"slice-{i}.png") for i in range(3)]
    r = post_batch(client, user_headers, files, client_ref=["A-0", "A-1", "A-2"])
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    assert len(body["job_ids"]) == 3 and body["rejected"] == []
    assert r.headers["Location"] == body["status_url"]
    assert broker.llen("inference") == 3  # each job enqueued after its row committed

    for job_id, (data, name) in zip(body["job_ids"], files, strict=True):
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None and str(job.batch_id) == body["id"]
        assert job.input_filename == name
        assert storage.get(job.input_key) == data

    view = client.get(f"/api/v1/batches/{body['id']}", headers=user_headers).get_json()
    assert view["status"] == "processing"
    assert view["counts"] == {
        "queued": 3,
        "processing": 0,
        "succeeded": 0,
        "rejected": 0,
        "failed": 0,
    }
    assert view["progress"] == 0.0
    assert [j["client_ref"] for j in view["jobs"]] == ["A-0", "A-1", "A-2"]


def test_a_zip_is_read_in_memory_entry_by_entry(
    client: FlaskClient, user_headers: dict[str, str], session: Session
) -> None:
    archive = make_zip(
        {
            "series/a.png": png_bytes(seed=1),
            "series/b.png": png_bytes(seed=2),
            "__MACOSX/series/._a.png": b"junk",
            ".DS_Store": b"junk",
        }
    )
    r = post_batch(client, user_headers, [(archive, "scans.zip"), (png_bytes(seed=3), "c.png")])
    assert r.status_code == 202, r.get_json()
    names = sorted(j["filename"] for j in r.get_json()["jobs"])
    assert names == ["c.png", "series/a.png", "series/b.png"]


def test_zip_with_a_path_traversal_entry_is_refused_whole(
    client: FlaskClient, user_headers: dict[str, str], session: Session, broker: redis.Redis
) -> None:
    archive = make_zip({"ok.png": png_bytes(seed=1), "../../etc/evil.png": png_bytes(seed=2)})
    r = post_batch(client, user_headers, [(archive, "scans.zip")])
    assert r.status_code == 422
    assert error_code(r) == "zip_unsafe_path"
    assert batch_count(session) == 0 and broker.llen("inference") == 0

    absolute = make_zip({"/abs/evil.png": png_bytes(seed=3)})
    r = post_batch(client, user_headers, [(absolute, "abs.zip")])
    assert error_code(r) == "zip_unsafe_path"


def test_zip_bomb_is_refused_before_it_inflates(
    client: FlaskClient, user_headers: dict[str, str], session: Session
) -> None:
    bomb = make_zip({"zeros.png": b"\0" * (20 * 1024 * 1024)})
    assert len(bomb) < 100_000
    r = post_batch(client, user_headers, [(bomb, "bomb.zip")])
    assert r.status_code == 413
    assert error_code(r) == "zip_bomb"
    assert batch_count(session) == 0


def test_zips_together_may_not_inflate_beyond_the_batch_limit(
    settings: Settings, client: FlaskClient, user_headers: dict[str, str], session: Session
) -> None:
    # LIVERSCAN_BATCH_MAX_MB bounds the total uncompressed size of a batch's zips (docs/batches.md),
    # not each zip's: else N zips inflate to N times the limit in the API's memory.
    settings.batch_max_mb = 1
    block = random.Random(6).randbytes(16 * 1024)  # repeated: deflate ratio ~40, under 100
    entry = block * 44  # ~700 KiB: one zip is under the 1 MiB limit, two together are over it
    zips = [(make_zip({f"part{i}/scan.png": entry}), f"part{i}.zip") for i in range(2)]
    assert all(len(data) < 100_000 for data, _ in zips)
    r = post_batch(client, user_headers, zips)
    assert r.status_code == 413
    assert error_code(r) == "zip_bomb"
    assert batch_count(session) == 0


def test_empty_batch_is_refused(client: FlaskClient, user_headers: dict[str, str]) -> None:
    r = client.post(
        "/api/v1/batches",
        headers=user_headers,
        data={"callback_url": ""},
        content_type="multipart/form-data",
    )
    assert r.status_code == 422 and error_code(r) == "empty_batch"
    only_dirs = make_zip({"empty/": b""})
    r = post_batch(client, user_headers, [(only_dirs, "nothing.zip")])
    assert r.status_code == 422 and error_code(r) == "empty_batch"
    r = post_batch(client, user_headers, [(b"", "blank.png")])
    assert error_code(r) == "empty_batch"


def test_batch_over_the_file_count_limit_is_refused(
    settings: Settings, client: FlaskClient, user_headers: dict[str, str], session: Session
) -> None:
    settings.batch_max_files = 3  # default 2000 (LIVERSCAN_BATCH_MAX_FILES)
    files = [(png_bytes(seed=i), f"s{i}.png") for i in range(4)]
    r = post_batch(client, user_headers, files)
    assert r.status_code == 413 and error_code(r) == "too_many_files"
    zipped = make_zip({f"s{i}.png": png_bytes(seed=i) for i in range(4)})
    r = post_batch(client, user_headers, [(zipped, "four.zip")])
    assert r.status_code == 413 and error_code(r) == "too_many_files"
    assert batch_count(session) == 0


def test_mixed_good_and_bad_files_complete_with_one_csv_row_each(
    client: FlaskClient, user_headers: dict[str, str], session: Session, storage: Storage
) -> None:
    too_big = b"\x89PNG" + b"x" * (1024 * 1024 + 10)  # tests allow 1 MB per file
    files = [
        (png_bytes(seed=1), "good.png"),
        (b"", "empty.png"),
        (too_big, "huge.png"),
        (b"this is a letter, not a scan", "=letter.png"),
    ]
    r = post_batch(client, user_headers, files)
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    assert sorted((x["filename"], x["code"]) for x in body["rejected"]) == [
        ("empty.png", "missing_file"),
        ("huge.png", "payload_too_large"),
    ]
    good_id, letter_id = (uuid.UUID(j) for j in body["job_ids"])

    finish(session, good_id, label="tumor", storage=storage)
    view = client.get(body["status_url"], headers=user_headers).get_json()
    assert view["status"] == "processing"  # the letter is still queued
    finish(session, letter_id, label=None, storage=storage)  # the validator rejects it

    view = client.get(body["status_url"], headers=user_headers).get_json()
    assert view["status"] == "completed" and view["completed_at"]
    assert view["counts"]["succeeded"] == 1 and view["counts"]["rejected"] == 1
    assert view["rejected_at_intake"] == 2 and view["progress"] == 1.0

    r = client.get(body["results_url"], headers=user_headers)
    assert r.status_code == 200 and r.mimetype == "text/csv"
    rows = {row["filename"]: row for row in csv.DictReader(io.StringIO(r.get_data(as_text=True)))}
    assert set(rows) == {"good.png", "'=letter.png", "empty.png", "huge.png"}
    good = rows["good.png"]
    assert (good["status"], good["label"], good["model_version"]) == ("succeeded", "tumor", "0.1.0")
    assert float(good["probability"]) == 0.87
    assert client.get(good["overlay_url"], headers=user_headers).status_code == 200
    assert rows["'=letter.png"]["status"] == "rejected"
    assert rows["'=letter.png"]["reason_code"] == "not_liver_ct"
    assert rows["huge.png"]["reason_code"] == "payload_too_large"


def test_batch_completed_webhook_is_scheduled_exactly_once(
    settings: Settings,
    client: FlaskClient,
    user_headers: dict[str, str],
    session: Session,
    storage: Storage,
) -> None:
    settings.webhook_allow_private = True
    files = [(png_bytes(seed=i), f"s{i}.png") for i in range(2)]
    r = post_batch(client, user_headers, files, callback_url="http://127.0.0.1:9/hook")
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    for job_id in body["job_ids"]:
        finish(session, uuid.UUID(job_id), label="normal", storage=storage)
    batch_id = uuid.UUID(body["id"])
    assert batches.on_job_terminal(session, batch_id) is None  # a late, duplicate finisher
    rows = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.event == "batch.completed")
    ).all()
    mine = [row for row in rows if row.payload and row.payload["batch"]["id"] == body["id"]]
    assert len(mine) == 1
    payload = mine[0].payload
    assert payload is not None and payload["batch"]["counts"]["succeeded"] == 2
    job = session.get(Job, mine[0].job_id)
    assert job is not None
    assert batches.callback_url_for(session, mine[0], job) == "http://127.0.0.1:9/hook"
    assert job.callback_url is None  # per-job events only when job_events=true


def test_another_organizations_batch_is_not_found(
    client: FlaskClient, user_headers: dict[str, str]
) -> None:
    r = post_batch(client, user_headers, [(png_bytes(seed=5), "a.png")])
    batch_id = r.get_json()["id"]
    other = signup(client, organization="Other clinic")
    other_headers = bearer(login(client, other["email"])["access_token"])
    for url in (f"/api/v1/batches/{batch_id}", f"/api/v1/batches/{batch_id}/results.csv"):
        r = client.get(url, headers=other_headers)
        assert r.status_code == 404 and error_code(r) == "batch_not_found"
    r = client.get("/api/v1/batches/not-a-uuid", headers=user_headers)
    assert r.status_code == 404 and error_code(r) == "batch_not_found"


def test_batches_are_in_the_openapi_document(client: FlaskClient) -> None:
    paths = client.get("/api/v1/openapi.json").get_json()["paths"]
    assert "post" in paths["/api/v1/batches"]
    assert "get" in paths["/api/v1/batches/{batch_id}"]
    assert "get" in paths["/api/v1/batches/{batch_id}/results.csv"]


# --- hostile zips (audit): every archive ends as jobs, refusals, or one documented error ------


def _random_payload(size: int = 64 * 1024) -> bytes:
    return random.Random(7).randbytes(size // 4) * 4  # compresses, but far below the ratio limit


def _corrupt_stream(compression: int) -> bytes:
    """A zip whose headers are fine but whose compressed bytes are garbage."""
    data = bytearray(make_zip({"a.png": _random_payload()}, compression))
    start = 30 + len("a.png")  # the local header, then the entry's compressed bytes
    if compression == zipfile.ZIP_DEFLATED:
        data[start] = 0xFF  # a deflate block of the reserved type 3
    else:
        data[start + 12 : start + 40] = b"\xff" * 28
    return bytes(data)


def _needs_newer_unzip() -> bytes:
    """A zip whose central directory asks for an unzip version that does not exist."""
    data = bytearray(make_zip({"a.png": _random_payload()}))
    data[data.find(b"PK\x01\x02") + 6] = 0xFF
    return bytes(data)


def _lying_directory_offset() -> bytes:
    """A zip whose end record puts the central directory 256 MiB further than it is."""
    data = bytearray(make_zip({"a.png": _random_payload()}))
    end = data.rfind(b"PK\x05\x06")
    (offset,) = struct.unpack_from("<L", data, end + 16)
    struct.pack_into("<L", data, end + 16, offset + 0x1000_0000)
    return bytes(data)


@pytest.mark.parametrize(
    "archive",
    [
        pytest.param(lambda: _corrupt_stream(zipfile.ZIP_DEFLATED), id="corrupt-deflate"),
        pytest.param(lambda: _corrupt_stream(zipfile.ZIP_LZMA), id="corrupt-lzma"),
        pytest.param(_needs_newer_unzip, id="unknown-zip-version"),
        pytest.param(_lying_directory_offset, id="lying-directory-offset"),
    ],
)
def test_a_zip_that_cannot_be_inflated_is_invalid_zip_not_a_500(
    client: FlaskClient,
    user_headers: dict[str, str],
    session: Session,
    broker: redis.Redis,
    archive: Any,
) -> None:
    r = post_batch(client, user_headers, [(archive(), "scans.zip"), (png_bytes(seed=1), "a.png")])
    assert r.status_code == 422, r.get_data()[:300]
    assert error_code(r) == "invalid_zip"
    assert batch_count(session) == 0 and broker.llen("inference") == 0  # nothing half-stored


def test_hostile_zips_end_in_files_or_a_documented_code() -> None:
    """Mutated archives (deflate, LZMA, bzip2, stored): never an exception without a code."""
    limits = batches.ZipLimits(
        max_entries=50, max_entry_bytes=1 << 20, max_total_bytes=1 << 24, max_ratio=100
    )
    seeds = [
        make_zip({"a.png": _random_payload(), "b/c.png": png_bytes(seed=2)}, compression)
        for compression in (
            zipfile.ZIP_DEFLATED,
            zipfile.ZIP_LZMA,
            zipfile.ZIP_BZIP2,
            zipfile.ZIP_STORED,
        )
    ]
    rng = random.Random(11)
    outcomes: dict[str, int] = {}
    for _ in range(600):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            batches.read_zip(bytes(data), limits)
            outcome = "read"
        except LiverscanError as exc:
            outcome = exc.code
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    documented = {"read", "invalid_zip", "zip_bomb", "zip_unsafe_path", "too_many_files"}
    assert set(outcomes) <= documented, outcomes


def test_junk_entries_are_skipped_and_listed(
    client: FlaskClient, user_headers: dict[str, str], session: Session
) -> None:
    archive = make_zip(
        {
            "series/a.png": png_bytes(seed=1),
            "__MACOSX/series/._a.png": b"junk",
            "series/._b.png": b"junk",
            ".DS_Store": b"junk",
            "series/.notes.png": png_bytes(seed=2),
        }
    )
    r = post_batch(client, user_headers, [(archive, "scans.zip")])
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    assert [j["filename"] for j in body["jobs"]] == ["series/a.png"]
    assert body["rejected"] == []
    assert sorted((s["filename"], s["reason"]) for s in body["skipped"]) == [
        (".DS_Store", "macos_metadata"),
        ("__MACOSX/series/._a.png", "macos_metadata"),
        ("series/._b.png", "macos_metadata"),
        ("series/.notes.png", "hidden_file"),
    ]
    r = post_batch(client, user_headers, [(png_bytes(seed=3), "c.png")])
    assert r.get_json()["skipped"] == []


def test_a_zip_of_junk_only_is_an_empty_batch_that_says_what_it_skipped(
    client: FlaskClient, user_headers: dict[str, str], session: Session
) -> None:
    archive = make_zip({"__MACOSX/._a.png": b"junk", "scans/.DS_Store": b"junk", "scans/": b""})
    r = post_batch(client, user_headers, [(archive, "mac.zip")])
    assert r.status_code == 422 and error_code(r) == "empty_batch"
    assert r.get_json()["error"]["details"]["skipped"] == [
        {"filename": "__MACOSX/._a.png", "reason": "macos_metadata"},
        {"filename": "scans/.DS_Store", "reason": "macos_metadata"},
    ]
    assert batch_count(session) == 0


def test_folder_entries_written_with_backslashes_are_folders(
    client: FlaskClient, user_headers: dict[str, str], session: Session
) -> None:
    # Some Windows tools write "series\\" for a folder: it is not an empty file to refuse.
    archive = make_zip({"series\\": b"", "series\\a.png": png_bytes(seed=1)})
    r = post_batch(client, user_headers, [(archive, "win.zip")])
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    assert [j["filename"] for j in body["jobs"]] == ["series/a.png"]
    assert body["rejected"] == [] and body["skipped"] == []


def _with_flag_bits(archive: bytes, bits: int) -> bytes:
    """The archive with general-purpose flag bits set on its first entry (local and central)."""
    data = bytearray(archive)
    data[6] |= bits
    data[data.find(b"PK\x01\x02") + 8] |= bits
    return bytes(data)


def _with_a_flipped_data_byte(archive: bytes) -> bytes:
    data = bytearray(archive)
    data[30 + len("a.png") + 40] ^= 0xFF  # inside the stored entry's bytes
    return bytes(data)


def _declaring_size(archive: bytes, size: int) -> bytes:
    """The archive whose headers declare `size` uncompressed bytes for its first entry."""
    data = bytearray(archive)
    struct.pack_into("<L", data, 22, size)
    struct.pack_into("<L", data, data.find(b"PK\x01\x02") + 24, size)
    return bytes(data)


@pytest.mark.parametrize(
    ("archive", "status", "code"),
    [
        pytest.param(lambda: make_zip({"C:\\scans\\a.png": png_bytes()}), 422, "zip_unsafe_path",
                     id="drive-letter"),
        pytest.param(lambda: make_zip({"\\\\server\\share\\a.png": png_bytes()}), 422,
                     "zip_unsafe_path", id="unc-path"),
        pytest.param(lambda: _with_flag_bits(make_zip({"a.png": png_bytes()}), 0x1), 422,
                     "invalid_zip", id="encrypted"),
        pytest.param(lambda: _with_a_flipped_data_byte(
            make_zip({"a.png": png_bytes()}, zipfile.ZIP_STORED)), 422, "invalid_zip", id="bad-crc"),
        pytest.param(lambda: make_zip({"a.png": _random_payload()})[:-300], 422, "invalid_zip",
                     id="truncated"),
        pytest.param(lambda: _declaring_size(make_zip({"a.png": _random_payload()}), 100), 422,
                     "invalid_zip", id="declares-less-than-it-inflates-to"),
    ],
)  # fmt: skip
def test_documented_zip_refusals_refuse_the_whole_batch(
    client: FlaskClient,
    user_headers: dict[str, str],
    session: Session,
    archive: Any,
    status: int,
    code: str,
) -> None:
    r = post_batch(client, user_headers, [(archive(), "scans.zip"), (png_bytes(seed=1), "b.png")])
    assert (r.status_code, error_code(r)) == (status, code)
    assert batch_count(session) == 0


def test_odd_but_harmless_entries_each_become_a_job(
    client: FlaskClient, user_headers: dict[str, str], session: Session
) -> None:
    """Duplicate names, a zip in the zip, a symlink entry and a very long name: one job each
    (the validator rejects what is not a scan), nothing dropped; ZIP64 reads like any zip."""
    buf = io.BytesIO()
    long_name = "n" * 300 + ".png"
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("a.png", "w", force_zip64=True) as fh:
            fh.write(png_bytes(seed=1))
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("a.png", png_bytes(seed=2))
        zf.writestr("inner.zip", make_zip({"c.png": png_bytes(seed=3)}))
        link = zipfile.ZipInfo("link.png")
        link.external_attr = 0o120777 << 16  # a symlink: its content is the target's path
        zf.writestr(link, "/etc/passwd")
        zf.writestr(long_name, png_bytes(seed=4))
    r = post_batch(client, user_headers, [(buf.getvalue(), "odd.zip")])
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    assert [j["filename"] for j in body["jobs"]] == [
        "a.png",
        "a.png",
        "inner.zip",
        "link.png",
        long_name[-255:],
    ]
    assert body["rejected"] == [] and body["skipped"] == []
    assert len(set(body["job_ids"])) == 5


def test_a_zip_directory_far_longer_than_the_file_limit_is_refused_before_it_is_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Millions of tiny (junk or folder) entries would cost ~9x the zip in memory once parsed:
    the end record's entry count is read first, and a directory listing more than twice the file
    limit plus 1,000 entries is too_many_files without parsing it. A macOS zip (every file with
    its __MACOSX twin, and folders) at the limit still reads."""
    limits = batches.ZipLimits(
        max_entries=3, max_entry_bytes=1 << 20, max_total_bytes=1 << 24, max_ratio=100
    )
    entries = {f"s{i}.png": png_bytes(seed=i) for i in range(3)}
    entries.update({f"__MACOSX/._s{i}.png": b"junk" for i in range(3)})
    entries.update({f"d{i}/": b"" for i in range(20)})
    assert len(batches.read_zip(make_zip(entries), limits).files) == 3
    flood = dict(entries)
    flood.update({f"__MACOSX/._{i}": b"" for i in range(2 * 3 + 1000)})
    flood_zip = make_zip(flood)
    parsed: list[bool] = []
    real = zipfile.ZipFile

    def watching(*args: Any, **kwargs: Any) -> zipfile.ZipFile:
        parsed.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(batches.zipfile, "ZipFile", watching)
    with pytest.raises(LiverscanError) as err:
        batches.read_zip(flood_zip, limits)
    assert err.value.code == "too_many_files"
    assert err.value.details["directory_entries"] == len(flood)
    assert parsed == []  # refused from the end record alone
