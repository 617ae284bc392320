"""A live liverscan stack whose dependencies a test can break: the API and a Celery worker as real
processes, PostgreSQL and S3 (moto's server) behind TCP proxies the test opens and closes, a Redis
server of its own that it can kill and restart, and a webhook receiver behind a proxy too.

Process start-up, the environment and the clinic client come from tests/e2e/e2e_support.py; this
module adds what fault injection needs. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import redis

from api.domain.webhooks import DELIVERY_HEADER, SIGNATURE_HEADER, verify
from tests.e2e.e2e_support import DATA, ROOT, spawn, wait_until

log = logging.getLogger(__name__)


def liver_slice_png() -> bytes:
    """A real liver CT slice (3Dircadb1.7, the slice with the most liver) windowed W400/L50 as PNG."""
    from ml_core.overlay import encode_png
    from ml_core.preprocessing import window

    volume = np.load(DATA / "ircadb" / "3Dircadb1.7.npz")
    z = int(volume["liver"].sum(axis=(1, 2)).argmax())
    return encode_png(window(volume["ct_hu"][z].astype(np.float32), width=400.0, level=50.0))


def port_in(first: int, last: int) -> int:
    """The first port of [first, last] on 127.0.0.1 that nothing listens on right now."""
    for port in range(first, last + 1):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{last}")


class TcpProxy:
    """A loopback TCP proxy to `target_port`. `down()` resets every open connection and closes the
    listening socket (clients get ECONNREFUSED); `up()` listens again on the same port."""

    def __init__(self, target_port: int, port: int) -> None:
        self.target_port = target_port
        self.port = port
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._accepting: threading.Thread | None = None

    @property
    def is_up(self) -> bool:
        """Whether the proxy accepts connections."""
        return self._listener is not None

    def up(self) -> None:
        """Listen and forward (idempotent)."""
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.1)
        self._listener = listener
        self._stop.clear()
        self._accepting = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._accepting.start()

    def down(self) -> None:
        """Stop listening and reset every forwarded connection (idempotent)."""
        listener, self._listener = self._listener, None
        self._stop.set()
        if self._accepting is not None:
            self._accepting.join(timeout=5)
        if listener is not None:
            listener.close()
        with self._lock:
            doomed, self._sockets = self._sockets, set()
        for sock in doomed:
            _reset(sock)

    @contextmanager
    def outage(self) -> Iterator[None]:
        """The target is unreachable inside the block."""
        self.down()
        try:
            yield
        finally:
            self.up()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _reset(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with self._lock:
                    self._sockets.discard(sock)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST, as a crashed peer or a dropped route looks to the client."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


class RedisServer:
    """A redis-server of the test's own, without persistence: a restart loses every message."""

    def __init__(self, port: int, folder: Path) -> None:
        self.port = port
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        self.folder.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.folder)]  # fmt: skip
        log_file = (self.folder / "redis.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(answers, 30, f"redis-server on port {self.port}")

    def kill(self) -> None:
        """SIGKILL the server (a crash: queued messages are gone)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None


@dataclass
class Delivery:
    """One webhook POST as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float  # unix seconds: signatures are checked for freshness at this moment

    @property
    def payload(self) -> dict[str, Any]:
        """The parsed JSON body."""
        return dict(json.loads(self.body))

    @property
    def delivery_id(self) -> str:
        """X-Liverscan-Delivery."""
        return self.headers[DELIVERY_HEADER]


@dataclass
class Receiver:
    """A loopback webhook endpoint that answers 204 and keeps every POST; `unique()` deduplicates
    by X-Liverscan-Delivery, as the contract asks receivers to."""

    url: str = ""
    received: list[Delivery] = field(default_factory=list)

    def for_jobs(self, job_ids: set[str]) -> list[Delivery]:
        """Every POST whose job is one of `job_ids`, in arrival order."""
        return [d for d in list(self.received) if d.payload.get("job", {}).get("id") in job_ids]

    @staticmethod
    def unique(deliveries: list[Delivery]) -> dict[str, Delivery]:
        """The first POST of each delivery id."""
        out: dict[str, Delivery] = {}
        for delivery in deliveries:
            out.setdefault(delivery.delivery_id, delivery)
        return out

    @staticmethod
    def signed(delivery: Delivery, secret: str) -> bool:
        """Whether the POST carried a valid, fresh signature under `secret` when it arrived."""
        return verify(
            secret,
            delivery.body,
            delivery.headers[SIGNATURE_HEADER],
            now=int(delivery.received_at),
        )


@contextmanager
def running_receiver(port: int) -> Iterator[Receiver]:
    """A Receiver listening on `port` for the duration of the block."""
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = dict(self.headers.items())
            state.received.append(Delivery(self.path, headers, body, time.time()))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{port}/liverscan-events"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def api_command(port: int) -> list[str]:
    """The API under waitress on 127.0.0.1:`port`."""
    return [sys.executable, "-m", "waitress", "--host=127.0.0.1", f"--port={port}", "--threads=8",
            "--call", "api.app:create_app"]  # fmt: skip


def worker_command(name: str, concurrency: int = 1) -> list[str]:
    """One prefork Celery worker consuming the inference and webhooks queues."""
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
            "--pool=prefork", f"--concurrency={concurrency}", "--queues=inference,webhooks",
            f"--hostname={name}@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle",
            "--without-heartbeat"]  # fmt: skip


def children(pid: int) -> list[int]:
    """The direct child processes of `pid` (Linux /proc)."""
    try:
        raw = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in raw.split()]


def alive(pid: int) -> bool:
    """Whether `pid` is a running (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class WorkerProcess:
    """A Celery worker (main process + prefork children) that a test may SIGKILL and restart."""

    def __init__(self, env: dict[str, str], logs: Path, name: str = "rel") -> None:
        self.env, self.logs, self.name = env, logs, name
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start the worker and wait until a child has loaded the model (it logs "model ... loaded")."""
        self.starts += 1
        log_path = self.logs / f"worker-{self.starts}.log"
        self.process = spawn(worker_command(self.name), self.env, log_path)
        wait_until(
            lambda: self._check_alive() and "ready." in log_path.read_text(errors="replace"),
            240,
            "the worker to be ready",
        )

    def _check_alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"the worker exited early; see {self.logs}")
        return True

    def pool_children(self) -> list[int]:
        """The prefork children now running."""
        if self.process is None or self.process.poll() is not None:
            return []
        return [pid for pid in children(self.process.pid) if alive(pid)]

    def kill_child(self) -> int | None:
        """SIGKILL one pool child (the one running the task); the main process forks another."""
        for pid in self.pool_children():
            os.kill(pid, signal.SIGKILL)
            return pid
        return None

    def kill(self) -> None:
        """SIGKILL the main process and its children (no graceful shutdown, no acks)."""
        if self.process is None:
            return
        for pid in self.pool_children():
            os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it lingers."""
        if self.process is None:
            return
        pids = self.pool_children()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.process = None

    @property
    def running(self) -> bool:
        """Whether the main process is alive."""
        return self.process is not None and self.process.poll() is None


class Periodic:
    """Call `fn` every `interval_s` in a daemon thread until stopped; errors are logged, not raised
    (the sweep runs through outages like the beat-scheduled task does)."""

    def __init__(self, fn: Callable[[], object], interval_s: float) -> None:
        self.fn, self.interval_s = fn, interval_s
        self.runs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        """Start the loop."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and wait for the current call."""
        self._stop.set()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.fn()
                self.runs += 1
            except Exception as exc:  # an outage: the next run retries
                log.info("periodic %s failed: %s", getattr(self.fn, "__name__", "call"), exc)


__all__ = [
    "ROOT",
    "Delivery",
    "Periodic",
    "Receiver",
    "RedisServer",
    "TcpProxy",
    "WorkerProcess",
    "api_command",
    "liver_slice_png",
    "port_in",
    "running_receiver",
    "worker_command",
]
