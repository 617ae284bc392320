"""`liverscan submit --batch`: the server stores and enqueues every file before it answers, which
takes minutes for thousands of slices; the client's wait grows with the batch instead of giving up
after the fixed request timeout (a 2,000-slice batch used to fail there with `unreachable`)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from api import cli

SERVER_WORK_S = 1.0  # how long the fake server "stores and enqueues" before answering


@pytest.fixture
def slow_server() -> Iterator[str]:
    """A loopback API that answers POST /api/v1/batches after SERVER_WORK_S."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(SERVER_WORK_S)
            body = json.dumps({"id": str(uuid.uuid4()), "job_ids": ["a", "b", "c", "d"]}).encode()
            self.send_response(202)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_a_batch_post_may_take_longer_than_one_request_timeout(
    slow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Request timeout 0.3 s, server busy 1 s: a 4-file batch (0.3 + 4 x 0.5 s allowed) goes
    through; the same wait for a single non-batch request would have failed."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setattr(cli, "TIMEOUT_S", 0.3)
    cli.Client(slow_server, "access", "refresh", "dr@clinic.test").save()
    for k in range(4):
        (tmp_path / f"s{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes([k]) * 64)

    assert cli.main(["submit", str(tmp_path / "s0.png"), str(tmp_path / "s1.png"),
                     str(tmp_path / "s2.png"), str(tmp_path / "s3.png"), "--batch"]) == 0  # fmt: skip
    assert "4 jobs queued" in capsys.readouterr().err  # the console (stderr); stdout: the id
    with pytest.raises(cli.CliError) as failed:
        cli.Client.load().request("POST", "/api/v1/batches", data=b"x")
    assert failed.value.code == "unreachable"
