"""The webhook SSRF guard at delivery time: the callback host is resolved once, every address it
resolves to must be public (unless LIVERSCAN_WEBHOOK_ALLOW_PRIVATE), and the POST goes to that
checked address — a name that rebinds to another address afterwards cannot redirect it — while
the URL's host stays in the Host header and, over TLS, in SNI and the certificate check.

DNS is the one boundary faked here (a resolver answering per name, in sequence); the receivers
are real HTTP and HTTPS servers on loopback."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.domain import jobs
from api.domain import webhooks as domain_webhooks
from api.domain.errors import CallbackUrlRefused
from api.domain.models import Organization, WebhookDelivery
from api.domain.queue import CeleryQueue
from api.domain.settings import Settings
from api.domain.storage import LocalStorage, StoredObject
from api.domain.webhooks import post_pinned, resolve_callback
from tests.security.conftest import REDIS_URL


@dataclass
class FakeDns:
    """Answers for made-up names, one list of addresses per lookup (the last one repeats);
    every other name goes to the real resolver."""

    answers: dict[str, list[list[str]]] = field(default_factory=dict)
    lookups: dict[str, int] = field(default_factory=dict)


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    """socket.getaddrinfo with made-up names."""
    fake = FakeDns()
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in fake.answers:
            return real(host, port, *args, **kwargs)
        n = fake.lookups.get(host, 0)
        fake.lookups[host] = n + 1
        sequence = fake.answers[host]
        addresses = sequence[min(n, len(sequence) - 1)]
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (a, int(port)),
            )
            for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return fake


@dataclass
class Seen:
    """What a receiver saw: Host headers, bodies, TLS server names."""

    hosts: list[str] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)
    port: int = 0


def _serve(wrap: Callable[[socket.socket], socket.socket] | None = None) -> Iterator[Seen]:
    seen = Seen()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            seen.hosts.append(self.headers["Host"])
            seen.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if wrap is not None:
        server.socket = wrap(server.socket)
    seen.port = server.server_port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_receiver() -> Iterator[Seen]:
    """A plain HTTP receiver on 127.0.0.1 (and nothing on 127.0.0.2 at that port)."""
    yield from _serve()


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def https_receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Seen]:
    """An HTTPS receiver on 127.0.0.1 whose certificate names only hooks.example; the delivery
    code trusts that certificate (as it would a public CA's) and nothing else."""
    cert, key = _self_signed(tmp_path, "hooks.example")
    monkeypatch.setattr(domain_webhooks, "CA_BUNDLE", str(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,return-value]
    for seen in _serve(lambda sock: context.wrap_socket(sock, server_side=True)):
        seen.server_names = names
        yield seen


def test_a_name_with_any_private_address_is_refused(dns: FakeDns) -> None:
    dns.answers["mixed.example"] = [["93.184.216.34", "10.1.2.3"]]
    with pytest.raises(CallbackUrlRefused) as refused:
        resolve_callback("https://mixed.example/hook", allow_private=False)
    assert refused.value.details == {"reason": "private_address", "addresses": ["10.1.2.3"]}
    dns.answers["public.example"] = [["93.184.216.34"]]
    target = resolve_callback("https://public.example/hook?x=1", allow_private=False)
    assert (target.address, target.port, target.path) == ("93.184.216.34", 443, "/hook?x=1")
    assert target.host_header == "public.example"


def test_the_post_goes_to_the_checked_address_not_a_rebound_one(
    dns: FakeDns, http_receiver: Seen
) -> None:
    """After the check the name answers 127.0.0.2 (where nothing listens): no second lookup."""
    dns.answers["hooks.example"] = [["127.0.0.1"], ["127.0.0.2"]]
    url = f"http://hooks.example:{http_receiver.port}/events"
    target = resolve_callback(url, allow_private=True)
    assert post_pinned(target, b'{"n":1}', {"Content-Type": "application/json"}, 5.0) == 204
    assert dns.lookups["hooks.example"] == 1
    assert http_receiver.hosts == [f"hooks.example:{http_receiver.port}"]
    assert http_receiver.bodies == [b'{"n":1}']


def test_https_keeps_sni_host_header_and_certificate_check_on_the_name(
    dns: FakeDns, https_receiver: Seen
) -> None:
    dns.answers["hooks.example"] = [["127.0.0.1"]]
    target = resolve_callback(f"https://hooks.example:{https_receiver.port}/e", True)
    assert post_pinned(target, b"{}", {}, 5.0) == 204
    assert https_receiver.server_names == ["hooks.example"]
    assert https_receiver.hosts == [f"hooks.example:{https_receiver.port}"]
    # The certificate is checked against the URL's name, not the pinned IP: another name on the
    # same address does not get through.
    dns.answers["other.example"] = [["127.0.0.1"]]
    other = resolve_callback(f"https://other.example:{https_receiver.port}/e", True)
    with pytest.raises(urllib3.exceptions.SSLError):
        post_pinned(other, b"{}", {}, 5.0)
    assert len(https_receiver.hosts) == 1


@pytest.fixture
def worker_context(
    tmp_path: Path,
    security_pg_url: str,
    security_engine: Engine,
    session_factory: sessionmaker[Session],
) -> Any:
    """The worker's context on this test's transaction; loopback callbacks refused."""
    from worker.context import WorkerContext

    settings = Settings(
        env="test",
        data_dir=tmp_path,
        database_url=security_pg_url,
        broker_url=REDIS_URL,
        webhook_allow_private=False,
    )
    return WorkerContext(
        settings=settings,
        engine=security_engine,
        sessions=session_factory,
        storage=LocalStorage(tmp_path / "store"),
        queue=CeleryQueue(REDIS_URL),
    )


def _scheduled_event(ctx: Any, callback_url: str) -> uuid.UUID:
    """A failed job of a fresh organization with its event scheduled; the attempt's row id."""
    from worker import webhooks

    with ctx.sessions.begin() as session:
        org = Organization(name="Clinic R", webhook_secret="whsec_" + uuid.uuid4().hex)
        session.add(org)
        session.flush()
        job_id = uuid.uuid4()
        upload = StoredObject(f"{org.id}/{job_id}/input", 1, "0" * 64, "image/png")
        jobs.create_job(
            session, org_id=org.id, upload=upload, job_id=job_id, callback_url=callback_url
        )
        jobs.mark_processing(session, job_id)
        job = jobs.mark_failed(session, job_id, error_code="undecodable", error_message="x")
        row_id = webhooks.schedule(session, job, ctx)
    assert row_id is not None
    return row_id


def test_worker_refuses_a_name_that_rebound_to_loopback_since_submit(
    dns: FakeDns, http_receiver: Seen, worker_context: Any, redis_db: Any
) -> None:
    """Public when the clinic submitted, loopback when the event is sent: never POSTed."""
    from worker import webhooks

    dns.answers["rebind.example"] = [["93.184.216.34"], ["127.0.0.1"]]
    url = f"http://rebind.example:{http_receiver.port}/events"
    assert domain_webhooks.check_callback_url(url, allow_private=False) == url  # at submit
    row_id = _scheduled_event(worker_context, url)
    assert webhooks.deliver(row_id, context=worker_context) == "exhausted"
    assert http_receiver.hosts == []
    with worker_context.sessions() as session:
        row = session.get(WebhookDelivery, row_id)
        assert row is not None and row.error == "callback_url_refused: private_address"


def test_worker_delivers_to_the_address_it_checked(
    dns: FakeDns, http_receiver: Seen, worker_context: Any, redis_db: Any
) -> None:
    """With private addresses allowed (tests), the worker still connects to the checked one."""
    from worker import webhooks

    worker_context.settings.webhook_allow_private = True
    dns.answers["hooks.example"] = [["127.0.0.1"], ["127.0.0.2"]]
    row_id = _scheduled_event(worker_context, f"http://hooks.example:{http_receiver.port}/e")
    assert webhooks.deliver(row_id, context=worker_context) == "succeeded"
    assert dns.lookups["hooks.example"] == 1
    assert http_receiver.hosts == [f"hooks.example:{http_receiver.port}"]
