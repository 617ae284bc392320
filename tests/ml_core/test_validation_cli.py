"""`python -m ml_core validate`: an operator checks a folder before sending a batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ml_core", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture()
def batch(tmp_path: Path, make: SimpleNamespace, ircadb, read) -> Path:  # type: ignore[no-untyped-def]
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    (tmp_path / "liver.png").write_bytes(make.png(make.window(ircadb.hu)))
    (tmp_path / "nested" / "liver.dcm").write_bytes(make.dicom(make.ct_dataset(ircadb.hu)))
    (tmp_path / "nested" / "deeper" / "photo.jpg").write_bytes(read("negatives/skimage/rocket.jpg"))
    (tmp_path / "nested" / "deeper" / "scan.png").write_bytes(b"")  # an empty "PNG"
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden files are skipped
    return tmp_path


def test_table_lists_every_file_with_its_reason(batch: Path) -> None:
    done = _cli("validate", "--no-gate", str(batch))
    assert done.returncode == 1, done.stderr  # some files were rejected
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["file", "passed", "reason_code", "detail"]
    rows = {Path(line.split()[0]).name: line for line in lines[1:-1]}
    assert set(rows) == {"liver.png", "liver.dcm", "photo.jpg", "scan.png"}
    assert " true " in rows["liver.png"] and " true " in rows["liver.dcm"]
    assert "not_grayscale" in rows["photo.jpg"] and "% of pixels coloured" in rows["photo.jpg"]
    assert "empty_file" in rows["scan.png"]
    assert lines[-1] == "2/4 passed (content gate not run)"


def test_json_lines_carry_the_validation_block(batch: Path) -> None:
    done = _cli("validate", "--json", "--no-gate", str(batch / "nested"), str(batch / "liver.png"))
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    by_name = {Path(r["file"]).name: r for r in rows}
    assert set(by_name) == {"liver.dcm", "photo.jpg", "scan.png", "liver.png"}
    assert by_name["liver.dcm"]["passed"] is True
    assert by_name["photo.jpg"]["validation"]["reason_code"] == "not_grayscale"
    assert by_name["scan.png"]["reason_code"] == "empty_file"
    checks = by_name["liver.dcm"]["validation"]["checks"]
    assert {
        "name": "dicom_modality",
        "passed": True,
        "detail": "Modality CT; allowed CT, MR",
    } in checks


def test_all_passing_exits_zero(batch: Path) -> None:
    assert _cli("validate", "--no-gate", str(batch / "liver.png")).returncode == 0


def test_missing_model_is_a_clear_error(batch: Path, tmp_path: Path) -> None:
    done = _cli("validate", "--model", str(tmp_path / "no-such-model"), str(batch / "liver.png"))
    assert done.returncode == 2
    assert "cannot load the content gate" in done.stderr and "--no-gate" in done.stderr


def test_missing_path_is_reported_as_unreadable(tmp_path: Path) -> None:
    done = _cli("validate", "--no-gate", str(tmp_path / "not-there.png"))
    assert done.returncode == 1  # an unreadable path is reported as a row, not a crash
    assert "unreadable" in done.stdout


def test_train_and_evaluate_are_wired(tmp_path: Path) -> None:
    for sub in ("train", "evaluate"):
        done = _cli(sub, "--help")
        assert done.returncode == 0, done.stderr
        assert f"usage: python -m ml_core {sub}" in done.stdout


def test_nifti_volume_is_checked_slice_by_slice(tmp_path: Path, ircadb, data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    import nibabel as nib

    volume = np.stack([ircadb.hu.T[::-1, ::-1]] * 3, axis=-1).astype(np.int16)  # RAS+ (x, y, z)
    nib.save(nib.Nifti1Image(volume, np.diag([0.7, 0.7, 2.5, 1.0])), tmp_path / "liver_ct.nii.gz")
    done = _cli(
        "validate",
        "--json",
        "--no-gate",
        str(tmp_path / "liver_ct.nii.gz"),
        str(data_dir / "totalsegmentator" / "example_ct_sm.nii.gz"),
    )
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    ours = [r for r in rows if "liver_ct.nii.gz#z=" in r["file"]]
    assert [r["passed"] for r in ours] == [True, True, True]
    small = [r for r in rows if "example_ct_sm.nii.gz#z=" in r["file"]]
    assert len(small) == 30 and {r["reason_code"] for r in small} == {"too_small"}  # 3 mm, 122x101
