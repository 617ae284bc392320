"""The `liverscan` command-line client: log in, submit files/folders/zips (as jobs or one batch),
wait with a progress bar (resumable), fetch results as CSV, check status, validate locally.

Talks to the HTTP API with `requests` only: it never imports Flask or TensorFlow (NIfTI volumes are
split with ml_core's decoder when ml_core is installed; `validate` runs `python -m ml_core`).
Credentials live in the user's config dir (platformdirs: `$XDG_CONFIG_HOME/liverscan/` else
`~/.config/liverscan/` on Linux), file mode 0600.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import io
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from platformdirs import user_config_dir
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from urllib3 import encode_multipart_formdata

log = logging.getLogger("liverscan.cli")

DEFAULT_SERVER = "http://127.0.0.1:8000"
TERMINAL = {"succeeded", "rejected", "failed"}
CSV_COLUMNS = (
    "filename",
    "client_ref",
    "status",
    "reason_code",
    "label",
    "probability",
    "model_version",
    "overlay_url",
    "job_id",
)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 10.0
BATCH_S_PER_FILE = 0.5  # extra seconds a batch POST may take per file (2,000 files: 20 min)
RATE_LIMIT_RETRIES = 10

console = Console(stderr=True, highlight=False)


class CliError(Exception):
    """A failure to report to the user as `error: <code>: <message>` with exit status 1 or 2."""

    def __init__(self, message: str, *, code: str = "cli_error", exit_status: int = 1) -> None:
        super().__init__(message)
        self.message, self.code, self.exit_status = message, code, exit_status


def say(line: str) -> None:
    """Write one line of the command's output (ids, statuses) to stdout."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def config_dir() -> Path:
    """Where the client keeps its credentials and waiting state (Linux: $XDG_CONFIG_HOME/liverscan)."""
    return Path(user_config_dir("liverscan", appauthor=False))


def _write_private(path: Path, data: dict[str, Any]) -> None:
    """Write JSON readable by the owner only (0600), replacing the file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def credentials_path() -> Path:
    """The credentials file."""
    return config_dir() / "credentials.json"


def state_path() -> Path:
    """The state file of the last submission (lets `liverscan wait` resume)."""
    return config_dir() / "last_submission.json"


@dataclass
class Client:
    """An authenticated API client that refreshes its access token once on a 401."""

    server: str
    access_token: str
    refresh_token: str
    email: str

    @classmethod
    def load(cls) -> Client:
        """The client of the saved credentials (`liverscan login` first)."""
        path = credentials_path()
        if not path.is_file():
            raise CliError("Not logged in: run `liverscan login` first.", code="not_logged_in")
        data = json.loads(path.read_text())
        return cls(data["server"], data["access_token"], data["refresh_token"], data["email"])

    def save(self) -> None:
        """Store the credentials with 0600 permissions."""
        _write_private(
            credentials_path(),
            {
                "server": self.server,
                "email": self.email,
                "access_token": self.access_token,
                "refresh_token": self.refresh_token,
            },
        )

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Call the API; refresh an expired access token once; wait out rate limits (429)."""
        response = self._send(method, path, self.access_token, **kwargs)
        if response.status_code == 401 and self._refresh():
            response = self._send(method, path, self.access_token, **kwargs)
        for _ in range(RATE_LIMIT_RETRIES):
            if response.status_code != 429:
                break
            time.sleep(_retry_after_s(response))
            response = self._send(method, path, self.access_token, **kwargs)
        if response.status_code >= 400:
            raise api_error(response)
        return response

    def _send(self, method: str, path: str, token: str, **kwargs: Any) -> requests.Response:
        url = path if path.startswith("http") else self.server.rstrip("/") + path
        options = dict(kwargs)
        headers = {"Authorization": f"Bearer {token}", **options.pop("headers", {})}
        body = options.get("data")
        if isinstance(body, io.IOBase):
            body.seek(0)  # a retry sends the streamed body again from its start
        timeout = options.pop("timeout", TIMEOUT_S)
        try:
            return requests.request(method, url, headers=headers, timeout=timeout, **options)
        except requests.RequestException as exc:
            raise CliError(f"Cannot reach {self.server}: {exc}", code="unreachable") from exc

    def _refresh(self) -> bool:
        response = self._send("POST", "/api/v1/auth/refresh", self.refresh_token)
        if response.status_code != 200:
            return False
        self.access_token = response.json()["access_token"]
        self.save()
        return True


def _retry_after_s(response: requests.Response) -> float:
    """The server's Retry-After in seconds (1..60; 5 when absent or not a number)."""
    try:
        return min(max(float(response.headers.get("Retry-After", "5")), 1.0), 60.0)
    except ValueError:
        return 5.0


def api_error(response: requests.Response) -> CliError:
    """The error envelope of a response as a CliError."""
    try:
        error = response.json()["error"]
        return CliError(str(error["message"]), code=str(error["code"]))
    except (ValueError, KeyError, TypeError):
        return CliError(f"HTTP {response.status_code}", code=f"http_{response.status_code}")


class UploadReader(io.BytesIO):
    """A request body that reports how many bytes the HTTP client has read (the upload bar)."""

    def __init__(self, data: bytes, on_read: Callable[[int], None]) -> None:
        super().__init__(data)
        self._on_read = on_read

    def read(self, size: int | None = -1) -> bytes:
        """Read like BytesIO and report the chunk's size."""
        chunk = super().read(size)
        self._on_read(len(chunk))
        return chunk


# --- inputs -------------------------------------------------------------------------------------


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def iter_inputs(paths: Sequence[str]) -> Iterator[tuple[Path, str]]:
    """The given files and every file under the given folders (sorted, hidden ones skipped), each
    with the name to send: a file's own name, or its path inside the folder given (a DICOM
    study repeats file names in every series folder, and results must tell them apart)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                rel = child.relative_to(path).parts
                if child.is_file() and not any(p.startswith(".") for p in rel):
                    yield child, "/".join(rel)
        elif path.is_file():
            yield path, path.name
        else:
            raise CliError(f"No such file or folder: {raw}", code="not_found", exit_status=2)


def nifti_slices(path: Path, name: str | None = None) -> list[tuple[str, bytes]]:
    """A NIfTI volume as windowed 8-bit PNG slices, named `<volume>#z<k>.png` (needs ml_core)."""
    name = name or path.name
    try:
        from ml_core.decoding import decode_volume
        from ml_core.errors import MLCoreError
        from ml_core.overlay import encode_png
        from ml_core.preprocessing import to_slice_u8
    except ImportError as exc:
        raise CliError(
            f"{path.name} is a NIfTI volume: splitting it into slices needs ml_core "
            "(pip install 'liverscan[ml]'), or send its slices as PNG/DICOM.",
            code="nifti_needs_ml_core",
            exit_status=2,
        ) from exc
    try:
        return [
            (f"{name}#z{k:04d}.png", encode_png(to_slice_u8(image)))
            for k, image in enumerate(decode_volume(path))
        ]
    except MLCoreError as exc:  # corrupt, truncated or 4-D volumes: bad local input
        raise CliError(f"{name}: {exc.message}", code=exc.code, exit_status=2) from exc


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(
            f"Cannot read {path}: {exc.strerror or exc}", code="unreadable", exit_status=2
        ) from exc


def collect(paths: Sequence[str]) -> list[tuple[str, bytes]]:
    """Every file to send as (name, bytes); folders recurse, NIfTI volumes become slices."""
    files: list[tuple[str, bytes]] = []
    for path, name in iter_inputs(paths):
        if _is_nifti(path):
            files.extend(nifti_slices(path, name))
        else:
            files.append((name, _read(path)))
    if not files:
        raise CliError("Nothing to submit.", code="empty_batch", exit_status=2)
    return files


def _is_zip(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


# --- commands -----------------------------------------------------------------------------------


def cmd_login(args: argparse.Namespace) -> int:
    """Exchange email and password for tokens and store them (0600)."""
    email = args.email or input("Email: ")
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass()
    server = args.server.rstrip("/")
    try:
        response = requests.post(
            f"{server}/api/v1/auth/login",
            json={"email": email, "password": password},
            timeout=TIMEOUT_S,
        )
    except requests.RequestException as exc:
        raise CliError(f"Cannot reach {server}: {exc}", code="unreachable") from exc
    if response.status_code != 200:
        raise api_error(response)
    tokens = response.json()
    Client(server, tokens["access_token"], tokens["refresh_token"], email).save()
    console.print(f"Logged in to {server} as {email}.")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Send the inputs as one batch (--batch, or any zip) or one job each; optionally wait."""
    client = Client.load()
    files = collect(args.paths)
    as_batch = args.batch or any(_is_zip(data) for _, data in files)
    form: dict[str, str] = {}
    if args.callback_url:
        form["callback_url"] = args.callback_url
    if as_batch:
        fields: list[tuple[str, Any]] = [("file", (name, data)) for name, data in files]
        fields += list(form.items())
        payload, content_type = encode_multipart_formdata(fields)
        with _progress() as progress:
            task = progress.add_task("uploading", total=len(payload), detail=f"{len(files)} files")
            response = client.request(
                "POST",
                "/api/v1/batches",
                data=UploadReader(payload, lambda n: progress.advance(task, n)),
                headers={"Content-Type": content_type},
                # The server stores, commits and enqueues every file before it answers: minutes
                # for thousands of slices on a busy server, so the wait grows with the batch.
                timeout=(CONNECT_TIMEOUT_S, TIMEOUT_S + BATCH_S_PER_FILE * len(files)),
            )
        body = response.json()
        state: dict[str, Any] = {"kind": "batch", "id": body["id"], "out": args.out}
        console.print(f"Batch {body['id']}: {len(body['job_ids'])} jobs queued.")
        for refused in body.get("rejected", []):
            console.print(f"  refused {refused['filename']}: {refused['code']}")
        skipped = body.get("skipped") or []
        if skipped:
            reasons = Counter(str(entry["reason"]) for entry in skipped)
            console.print(
                f"  skipped {len(skipped)} zip entries that are not scans ("
                + ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))
                + ")"
            )
        say(body["id"])
    else:
        job_ids: list[str] = []
        state = {"kind": "jobs", "ids": job_ids, "out": args.out, "server": client.server}
        with _progress() as progress:
            task = progress.add_task("uploading", total=len(files), detail="")
            for name, data in files:
                try:
                    response = client.request(
                        "POST", "/api/v1/jobs", files={"file": (name, data)}, data=form
                    )
                except CliError as exc:
                    # The jobs made so far exist: keep them followable, and say where it stopped.
                    _write_private(state_path(), state)
                    raise CliError(
                        f"{name}: {exc.message} ({len(job_ids)} of {len(files)} files were "
                        "submitted before it; `liverscan wait` follows them)",
                        code=exc.code,
                        exit_status=exc.exit_status,
                    ) from exc
                job_ids.append(response.json()["id"])
                say(job_ids[-1])
                progress.advance(task)
    state["server"] = client.server
    _write_private(state_path(), state)
    if args.wait:
        return wait_for(client, state, poll_s=args.poll)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    """Resume waiting for the last submission (or the batch given), then write its CSV."""
    client = Client.load()
    if args.id:
        state: dict[str, Any] = {"kind": "batch", "id": args.id, "out": args.out}
    else:
        if not state_path().is_file():
            raise CliError("No submission to wait for.", code="no_state", exit_status=2)
        state = json.loads(state_path().read_text())
        if args.out:
            state["out"] = args.out
    return wait_for(client, state, poll_s=args.poll)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
    )


def wait_for(client: Client, state: dict[str, Any], *, poll_s: float) -> int:
    """Poll until every job is terminal, showing progress; write the CSV to state['out']."""
    with _progress() as progress:
        task = progress.add_task("screening", total=None, detail="")
        while True:
            if state["kind"] == "batch":
                batch = client.request("GET", f"/api/v1/batches/{state['id']}").json()
                total = batch["job_count"] + batch["rejected_at_intake"]
                done, finished = batch["done"], batch["status"] == "completed"
                counts = batch["counts"]
                rows: list[dict[str, Any]] | None = None
            else:
                jobs = [client.request("GET", f"/api/v1/jobs/{i}").json() for i in state["ids"]]
                total, done = len(jobs), sum(j["status"] in TERMINAL for j in jobs)
                finished = done == total
                counts = {s: sum(j["status"] == s for j in jobs) for s in sorted(TERMINAL)}
                rows = [_job_row(j) for j in jobs]
            detail = " ".join(f"{k}={v}" for k, v in counts.items() if v)
            progress.update(task, total=total, completed=done, detail=detail)
            if finished:
                break
            time.sleep(poll_s)
    if state.get("out"):
        out = Path(state["out"])
        if state["kind"] == "batch":
            text = client.request("GET", f"/api/v1/batches/{state['id']}/results.csv").text
        else:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows or [])
            text = buf.getvalue()
        out.write_text(text)
        console.print(f"Results written to {out}.")
    console.print("All jobs finished: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _job_row(job: dict[str, Any]) -> dict[str, Any]:
    result = job.get("result") or {}
    validation = job.get("validation") or {}
    error = job.get("error") or {}
    probability = result.get("probability")
    return {
        "filename": (job.get("input") or {}).get("filename"),
        "client_ref": job.get("client_ref"),
        "status": job["status"],
        "reason_code": validation.get("reason_code") or error.get("code"),
        "label": result.get("label"),
        "probability": "" if probability is None else f"{probability:.6f}",
        "model_version": (result.get("model") or {}).get("version"),
        "overlay_url": result.get("overlay_url"),
        "job_id": job["id"],
    }


def cmd_status(args: argparse.Namespace) -> int:
    """Print one batch's progress or one job's outcome."""
    client = Client.load()
    try:
        batch = client.request("GET", f"/api/v1/batches/{args.id}").json()
    except CliError as exc:
        if exc.code != "batch_not_found":
            raise
    else:
        counts = ", ".join(f"{k} {v}" for k, v in batch["counts"].items())
        say(
            f"batch {batch['id']}: {batch['status']}, {batch['done']}/"
            f"{batch['job_count'] + batch['rejected_at_intake']} done ({counts}; "
            f"refused at intake {batch['rejected_at_intake']})"
        )
        return 0
    job = client.request("GET", f"/api/v1/jobs/{args.id}").json()
    row = _job_row(job)
    line = f"job {job['id']} ({row['filename']}): {job['status']}"
    if job["status"] == "succeeded":
        line += f", {row['label']} p={row['probability']} (model {row['model_version']})"
    elif row["reason_code"]:
        line += f", {row['reason_code']}"
    say(line)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate files locally, without uploading (runs `python -m ml_core validate`)."""
    command = [sys.executable, "-m", "ml_core", "validate", *args.paths]
    if args.json:
        command.append("--json")
    if args.no_gate:
        command.append("--no-gate")
    try:
        return subprocess.call(command)
    except OSError as exc:
        raise CliError(
            f"Cannot run ml_core: {exc}", code="ml_core_unavailable", exit_status=2
        ) from exc


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `liverscan`."""
    parser = argparse.ArgumentParser(prog="liverscan", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("login", help="log in and store credentials (0600)")
    p.add_argument(
        "--server", default=DEFAULT_SERVER, help=f"API base URL (default {DEFAULT_SERVER})"
    )
    p.add_argument("--email")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("submit", help="submit files, folders, zips, DICOM series, NIfTI volumes")
    p.add_argument("paths", nargs="+")
    p.add_argument("--batch", action="store_true", help="send everything as one batch")
    p.add_argument("--wait", action="store_true", help="wait until every job is finished")
    p.add_argument("--out", help="write the results CSV here once finished (with --wait)")
    p.add_argument("--callback-url", help="webhook URL (batch: one batch.completed event)")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between polls (default 2)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("wait", help="resume waiting for the last submission (or a batch id)")
    p.add_argument("id", nargs="?")
    p.add_argument("--out")
    p.add_argument("--poll", type=float, default=2.0)
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("status", help="the progress of a batch or the outcome of a job")
    p.add_argument("id")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("validate", help="validate files locally, without uploading")
    p.add_argument("paths", nargs="+")
    p.add_argument("--json", action="store_true", help="one JSON object per file per line")
    p.add_argument("--no-gate", action="store_true", help="rule layers only (no model load)")
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `liverscan` command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return int(args.func(args))
    except CliError as exc:
        console.print(f"error: {exc.code}: {exc.message}")
        return exc.exit_status
    except KeyboardInterrupt:
        console.print("interrupted: `liverscan wait` resumes waiting for the last submission")
        return 130


if __name__ == "__main__":
    sys.exit(main())
