"""The `liverscan` client against a live server: login, submit (files, folders, zips, NIfTI), wait
with a progress bar and a CSV at the end, resume waiting, status, local validation, bad input.

No worker process runs here: where a job must finish, the test drives it to its terminal state
through the same domain services the worker uses (tests/e2e covers the real worker)."""

from __future__ import annotations

import csv
import io
import json
import stat
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select

from api.domain import batches, jobs
from api.domain.models import Job
from tests.cli.conftest import ROOT, Account, Server, cli, start_cli


def png(path: Path, seed: int) -> Path:
    """Write a small grayscale PNG (distinct bytes per seed)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(path, format="PNG")
    return path


def finish_batch(server: Server, batch_id: str) -> None:
    """Play the worker: the first job succeeds, every other one is rejected by the validator."""
    with server.sessions() as session:
        ids = session.scalars(
            select(Job.id).where(Job.batch_id == uuid.UUID(batch_id)).order_by(Job.created_at)
        ).all()
        for n, job_id in enumerate(ids):
            jobs.mark_processing(session, job_id)
            if n == 0:
                jobs.mark_succeeded(
                    session,
                    job_id,
                    label="normal",
                    probability=0.12,
                    threshold=0.5,
                    model_name="liverscan-lite0",
                    model_version="0.1.0",
                    model_sha256="ab" * 32,
                    heatmap_key=None,
                    overlay_key=None,
                    validation={"passed": True, "reason_code": None, "checks": []},
                    input_meta=None,
                )
            else:
                jobs.mark_rejected(
                    session,
                    job_id,
                    reason_code="not_liver_ct",
                    validation={"passed": False, "reason_code": "not_liver_ct", "checks": []},
                    input_meta=None,
                )
            batches.on_job_terminal(session, uuid.UUID(batch_id))
            session.commit()


def test_the_client_imports_neither_flask_nor_tensorflow() -> None:
    code = (
        "import sys, api.cli; print(sorted(m for m in ('flask', 'tensorflow') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_the_liverscan_entry_point_is_declared() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'liverscan = "api.cli:main"' in text


def test_login_keeps_credentials_private(server: Server, account: Account) -> None:
    done = cli(
        account, "login", "--server", server.url, "--email", account.email, "--password-stdin",
        stdin="wrong-password-1\n",
    )  # fmt: skip
    assert done.returncode == 1
    assert "invalid_credentials" in done.stderr
    assert not (account.config_dir / "credentials.json").exists()

    done = cli(
        account, "login", "--server", server.url, "--email", account.email, "--password-stdin",
        stdin="liver-scan-2024\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    path = account.config_dir / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    saved = json.loads(path.read_text())
    assert saved["server"] == server.url and saved["access_token"] and saved["refresh_token"]


def test_submit_batch_waits_with_progress_and_writes_the_csv(
    server: Server, logged_in: Account, tmp_path: Path
) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    png(folder / "s1.png", 1)
    png(folder / "s2.png", 2)
    (folder / ".hidden.png").write_bytes(b"skipped")
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(png(tmp_path / "z.png", 3), "inner/z.png")
    out = tmp_path / "results.csv"

    proc = start_cli(
        logged_in, "submit", str(folder), str(archive), "--batch", "--wait", "--out", str(out),
        "--poll", "0.2",
    )  # fmt: skip
    assert proc.stdout is not None
    batch_id = proc.stdout.readline().strip()
    assert uuid.UUID(batch_id)
    finish_batch(server, batch_id)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "3 jobs queued" in stderr
    assert "uploading" in stderr and "3 files" in stderr  # the upload's progress bar
    assert "3/3" in stderr  # the progress bar's final state
    assert "succeeded 1" in stderr and "rejected 2" in stderr

    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert sorted(r["filename"] for r in rows) == ["inner/z.png", "s1.png", "s2.png"]
    assert sorted(r["status"] for r in rows) == ["rejected", "rejected", "succeeded"]
    succeeded = next(r for r in rows if r["status"] == "succeeded")
    assert succeeded["label"] == "normal" and succeeded["model_version"] == "0.1.0"


def test_waiting_resumes_from_the_state_file(
    server: Server, logged_in: Account, tmp_path: Path
) -> None:
    done = cli(logged_in, "submit", str(png(tmp_path / "a.png", 4)), "--batch")
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.strip()
    state = json.loads((logged_in.config_dir / "last_submission.json").read_text())
    assert state["id"] == batch_id

    status = cli(logged_in, "status", batch_id)
    assert status.returncode == 0
    assert f"batch {batch_id}: processing, 0/1 done" in status.stdout

    finish_batch(server, batch_id)
    out = tmp_path / "later.csv"
    done = cli(logged_in, "wait", "--out", str(out), "--poll", "0.2")
    assert done.returncode == 0, done.stderr
    assert [r["status"] for r in csv.DictReader(io.StringIO(out.read_text()))] == ["succeeded"]
    assert "completed, 1/1 done" in cli(logged_in, "status", batch_id).stdout


def test_single_jobs_and_their_status(server: Server, logged_in: Account, tmp_path: Path) -> None:
    done = cli(logged_in, "submit", str(png(tmp_path / "one.png", 5)))
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    status = cli(logged_in, "status", job_id)
    assert status.stdout.strip() == f"job {job_id} (one.png): queued"


def test_nifti_volume_is_split_into_slices(logged_in: Account, tmp_path: Path) -> None:
    import nibabel as nib

    volume = np.random.default_rng(0).integers(-100, 200, (24, 24, 3)).astype(np.int16)
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    done = cli(logged_in, "submit", str(path), "--batch")
    assert done.returncode == 0, done.stderr
    assert "3 jobs queued" in done.stderr

    blocked = (
        "import sys; sys.modules['ml_core'] = None; from api.cli import main; "
        f"sys.exit(main(['submit', {str(path)!r}, '--batch']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocked],
        cwd=ROOT,
        env=logged_in.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "nifti_needs_ml_core" in done.stderr


def test_bad_input_is_explained(server: Server, account: Account, tmp_path: Path) -> None:
    done = cli(account, "submit", str(png(tmp_path / "a.png", 6)))
    assert done.returncode == 1 and "not_logged_in" in done.stderr
    cli(
        account, "login", "--server", server.url, "--email", account.email, "--password-stdin",
        stdin="liver-scan-2024\n",
    )  # fmt: skip
    done = cli(account, "submit", str(tmp_path / "missing.png"))
    assert done.returncode == 2 and "not_found" in done.stderr
    bad_zip = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad_zip, "w") as zf:
        zf.writestr("../evil.png", b"x")
    done = cli(account, "submit", str(bad_zip))
    assert done.returncode == 1 and "zip_unsafe_path" in done.stderr


def test_validate_runs_locally_without_uploading(account: Account, tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Image.new("L", (64, 64), color=0).save(blank)
    done = cli(account, "validate", str(blank), "--json", "--no-gate")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    assert lines[0]["passed"] is False
    assert lines[0]["reason_code"]


def test_a_broken_nifti_volume_is_a_clear_error_not_a_traceback(
    logged_in: Account, tmp_path: Path
) -> None:
    import nibabel as nib

    garbage = tmp_path / "scan.nii.gz"
    garbage.write_bytes(b"\x1f\x8b" + b"not a volume" * 20)
    four_d = tmp_path / "perfusion.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2, 3), np.int16), np.eye(4)), str(four_d))
    for path, message in (
        (garbage, "scan.nii.gz: NIfTI volume could not be read"),
        (four_d, "perfusion.nii.gz: NIfTI volume has 4 dimensions, expected 3"),
    ):
        done = cli(logged_in, "submit", str(path), "--batch")
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert f"error: undecodable: {message}" in done.stderr


def test_an_unreadable_file_is_a_clear_error_not_a_traceback(logged_in: Account) -> None:
    # /proc/self/mem is a regular file that fails to read at offset 0 (EIO), even for root.
    done = cli(logged_in, "submit", "/proc/self/mem", "--batch")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "error: unreadable: Cannot read /proc/self/mem" in done.stderr


def test_files_of_subfolders_are_named_by_their_path_in_the_folder(
    server: Server, logged_in: Account, tmp_path: Path
) -> None:
    # A DICOM study exported by a PACS repeats file names in every series folder.
    for series, seed in (("SE1", 1), ("SE2", 2)):
        (tmp_path / "study" / series).mkdir(parents=True)
        png(tmp_path / "study" / series / "IM0001", seed)
    done = cli(logged_in, "submit", str(tmp_path / "study"), "--batch")
    assert done.returncode == 0, done.stderr
    with server.sessions() as session:
        names = session.scalars(
            select(Job.input_filename).where(Job.batch_id == uuid.UUID(done.stdout.strip()))
        ).all()
    assert sorted(names) == ["SE1/IM0001", "SE2/IM0001"]


def test_single_jobs_stopped_by_a_refusal_keep_the_ids_submitted_so_far(
    logged_in: Account, tmp_path: Path
) -> None:
    folder = tmp_path / "slices"
    folder.mkdir()
    png(folder / "a.png", 1)
    (folder / "b.png").write_bytes(b"")  # the API refuses an empty file: 422 missing_file
    png(folder / "c.png", 3)
    done = cli(logged_in, "submit", str(folder))
    assert done.returncode == 1
    assert "error: missing_file: b.png:" in done.stderr
    assert "1 of 3 files were submitted before it" in done.stderr
    (job_id,) = done.stdout.split()
    assert uuid.UUID(job_id)
    state = json.loads((logged_in.config_dir / "last_submission.json").read_text())
    assert state["ids"] == [job_id]


def test_zip_entries_skipped_as_junk_are_reported(logged_in: Account, tmp_path: Path) -> None:
    archive = tmp_path / "mac.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(png(tmp_path / "a.png", 1), "scans/a.png")
        zf.writestr("__MACOSX/scans/._a.png", b"junk")
        zf.writestr("scans/.DS_Store", b"junk")
    done = cli(logged_in, "submit", str(archive))
    assert done.returncode == 0, done.stderr
    assert "1 jobs queued" in done.stderr
    assert "skipped 2 zip entries that are not scans (macos_metadata 2)" in done.stderr
