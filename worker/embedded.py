"""The embedded runner behind `make run`: migrate, then the API, one worker and the sweep, supervised.

Everything runs on the settings' embedded defaults (SQLite, a local folder, the kombu SQLAlchemy
broker) unless LIVERSCAN_* says otherwise. SIGINT/SIGTERM (Ctrl-C reaches the whole process group)
stops every child cleanly; if one child dies the others are stopped and the exit status is 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from api.domain.queue import SWEEP, WEBHOOKS_QUEUE, make_queue
from api.domain.settings import Settings, get_settings

log = logging.getLogger("liverscan.embedded")

ROOT = Path(__file__).resolve().parents[1]
STOP_GRACE_S = 30.0


def child_commands(settings: Settings, host: str, port: int) -> dict[str, list[str]]:
    """The API server and the single worker process (the settings' pool: threads by default, so
    its jobs share micro-batched model calls; it also serves webhooks and report rendering)."""
    return {
        "api": [
            sys.executable,
            "-m",
            "waitress",
            f"--host={host}",
            f"--port={port}",
            "--threads=8",
            "--call",
            "api.app:create_app",
        ],
        "worker": [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app:celery_app",
            "worker",
            f"--pool={settings.worker_pool}",
            f"--concurrency={settings.worker_threads}",
            "--queues=inference,webhooks,reports",
            "--hostname=embedded@%h",
            f"--loglevel={settings.log_level}",
            "--without-gossip",
            "--without-mingle",
        ],
    }


def migrate() -> None:
    """Bring the database to the Alembic head (idempotent)."""
    subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "upgrade", "head"],
        cwd=ROOT,
        check=True,
    )


class Supervisor:
    """Starts the children, runs the sweep on a timer, and stops everything on a signal."""

    def __init__(self, settings: Settings, commands: dict[str, list[str]]) -> None:
        self.settings = settings
        self.commands = commands
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        self.stopping = True

    def run(self) -> int:
        """Run until a signal (exit 0) or until a child dies (exit 1)."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        for name, command in self.commands.items():
            self.children[name] = subprocess.Popen(command, cwd=ROOT)
            log.info("started %s (pid %d)", name, self.children[name].pid)
        queue = make_queue(self.settings)
        next_sweep = time.monotonic() + self.settings.sweep_interval_s
        status = 0
        while not self.stopping:
            dead = [n for n, p in self.children.items() if p.poll() is not None]
            if dead:
                log.error("%s exited unexpectedly; stopping the rest", ", ".join(dead))
                status = 1
                break
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.settings.sweep_interval_s
                try:
                    queue.enqueue(SWEEP, queue=WEBHOOKS_QUEUE)
                except Exception:
                    log.warning("could not enqueue the sweep; retrying next interval")
            time.sleep(0.2)
        self.stop()
        return status

    def stop(self) -> None:
        """SIGTERM every live child (warm shutdown), then SIGKILL what outlives the grace period."""
        for process in self.children.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for name, process in self.children.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", name, STOP_GRACE_S)
                process.kill()
                process.wait()
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m worker.embedded`."""
    settings = get_settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    parser.add_argument("--no-migrate", action="store_true", help="skip alembic upgrade head")
    args = parser.parse_args(argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(message)s")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_migrate:
        migrate()
    log.info("liverscan at http://%s:%d (data in %s)", args.host, args.port, settings.data_dir)
    return Supervisor(settings, child_commands(settings, args.host, args.port)).run()


if __name__ == "__main__":
    sys.exit(main())
