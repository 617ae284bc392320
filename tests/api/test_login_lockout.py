"""Smart lockout: failed logins from addresses an account never signed in from lock only those
addresses, so nobody who merely knows a clinician's email can lock the clinician out of the
addresses they work from; failures from a familiar address lock only that address."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import Engine, create_engine, delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from api.domain import accounts
from api.domain.accounts import LoginAddress, LoginThrottle
from api.domain.models import Organization, Role, User, utcnow
from api.domain.storage import Storage
from tests.api.conftest import PASSWORD, base_settings, make_app, signup

CLINIC = "198.51.100.10"  # where the clinician works
HOME = "198.51.100.20"  # where the clinician also signs in
ATTACKER = "203.0.113.66"  # somewhere the account never signed in from
PROXY = "10.0.0.2"  # a reverse proxy in front of the API: every connection comes from it
WRONG = "wrong-password-1"

ClientFactory = Callable[..., FlaskClient]


@pytest.fixture
def make_client(
    tmp_path: Path,
    database_url: str,
    session_factory: sessionmaker[Session],
    storage: Storage,
    broker: redis.Redis,
    engine: Engine,
) -> ClientFactory:
    """Build a client of an app that locks after 3 failures for 600 s (rate limits off, as in
    every API test), with further settings overrides."""

    def build(**overrides: object) -> FlaskClient:
        settings = base_settings(
            tmp_path, database_url, login_max_failures=3, login_lockout_s=600, **overrides
        )
        return make_app(settings, session_factory, storage, engine=engine).test_client()

    return build


@pytest.fixture
def client(make_client: ClientFactory) -> FlaskClient:
    """The client of an app with the default settings otherwise (no trusted proxy)."""
    return make_client()


def _login(
    client: FlaskClient, email: str, password: str, address: str, **headers: str
) -> tuple[int, str, str]:
    """Log in from `address`; status, error code (or "" on success) and Retry-After."""
    r = client.post(
        "/api/v1/auth/login",
        json={"email": email, "password": password},
        environ_base={"REMOTE_ADDR": address},
        headers=headers,
    )
    code = r.get_json()["error"]["code"] if r.status_code != 200 else ""
    return r.status_code, code, r.headers.get("Retry-After", "")


def test_an_attacker_cannot_lock_the_clinician_out_of_a_familiar_address(
    client: FlaskClient,
) -> None:
    email = signup(client)["email"]
    assert _login(client, email, PASSWORD, CLINIC)[0] == 200
    for _ in range(3):
        assert _login(client, email, WRONG, ATTACKER)[:2] == (401, "invalid_credentials")
    status, code, retry_after = _login(client, email, PASSWORD, ATTACKER)
    assert (status, code) == (423, "account_locked")  # even with the right password
    assert 590 <= int(retry_after) <= 600
    assert _login(client, email, WRONG, "203.0.113.67")[:2] == (423, "account_locked")
    assert _login(client, email, PASSWORD, CLINIC)[0] == 200


def test_failures_from_a_familiar_address_lock_only_that_address(client: FlaskClient) -> None:
    email = signup(client)["email"]
    assert _login(client, email, PASSWORD, CLINIC)[0] == 200
    assert _login(client, email, PASSWORD, HOME)[0] == 200
    for _ in range(3):
        assert _login(client, email, WRONG, CLINIC)[0] == 401
    status, code, retry_after = _login(client, email, PASSWORD, CLINIC)
    assert (status, code) == (423, "account_locked")
    assert 590 <= int(retry_after) <= 600
    assert _login(client, email, PASSWORD, HOME)[0] == 200
    assert _login(client, email, PASSWORD, "192.0.2.5")[0] == 200  # unfamiliar, not locked


def test_a_success_from_a_familiar_address_resets_only_its_count(client: FlaskClient) -> None:
    email = signup(client)["email"]
    assert _login(client, email, PASSWORD, CLINIC)[0] == 200
    for _ in range(2):
        assert _login(client, email, WRONG, CLINIC)[0] == 401
        assert _login(client, email, WRONG, ATTACKER)[0] == 401
    assert _login(client, email, PASSWORD, CLINIC)[0] == 200
    assert _login(client, email, WRONG, CLINIC)[0] == 401  # 1 of 3 again
    assert _login(client, email, WRONG, ATTACKER)[0] == 401  # the 3rd: the clinician's success
    assert _login(client, email, PASSWORD, ATTACKER)[:2] == (423, "account_locked")  # gave no tries
    assert _login(client, email, PASSWORD, CLINIC)[0] == 200


@pytest.mark.parametrize("address", [CLINIC, ATTACKER])
def test_each_failure_after_a_lock_doubles_it(
    client: FlaskClient, session: Session, address: str
) -> None:
    """The same doubling on a familiar address as on the email's unfamiliar ones."""
    email = signup(client)["email"]
    assert _login(client, email, PASSWORD, CLINIC)[0] == 200
    for _ in range(3):
        assert _login(client, email, WRONG, address)[0] == 401
    assert 590 <= int(_login(client, email, PASSWORD, address)[2]) <= 600
    past = utcnow() - timedelta(seconds=1)  # the lock ran out
    session.execute(update(LoginAddress).values(locked_until=past))
    session.execute(update(LoginThrottle).values(locked_until=past))
    session.commit()
    assert _login(client, email, WRONG, address)[0] == 401
    assert 1190 <= int(_login(client, email, PASSWORD, address)[2]) <= 1200


def test_an_unknown_email_is_throttled_like_a_known_one(client: FlaskClient) -> None:
    """From an unfamiliar address a lockout reveals nothing about which accounts exist."""
    known = signup(client)["email"]
    assert _login(client, known, PASSWORD, CLINIC)[0] == 200
    ghost = f"nobody-{uuid.uuid4().hex[:8]}@clinic.test"
    answers = {}
    for email in (known, ghost):
        answers[email] = [_login(client, email, WRONG, ATTACKER)[:2] for _ in range(4)]
        answers[email] += [_login(client, email, PASSWORD, "203.0.113.67")[:2]]
    assert (
        answers[known]
        == answers[ghost]
        == [(401, "invalid_credentials")] * 3 + [(423, "account_locked")] * 2
    )


def test_a_forwarded_for_header_does_not_make_an_address_familiar(client: FlaskClient) -> None:
    """Without a trusted proxy configured, the address is the connection's, not a header's."""
    email = signup(client)["email"]
    assert _login(client, email, PASSWORD, CLINIC)[0] == 200
    spoof = {"X-Forwarded-For": CLINIC, "X-Real-IP": CLINIC}
    for _ in range(3):
        assert _login(client, email, WRONG, ATTACKER, **spoof)[0] == 401
    assert _login(client, email, PASSWORD, ATTACKER, **spoof)[:2] == (423, "account_locked")
    assert _login(client, email, PASSWORD, CLINIC)[0] == 200


def test_behind_a_trusted_proxy_its_clients_are_told_apart(make_client: ClientFactory) -> None:
    """With LIVERSCAN_TRUSTED_PROXY_HOPS=1 every connection comes from the proxy; the client is
    the address the proxy appended to X-Forwarded-For, not one the client wrote there itself."""
    client = make_client(trusted_proxy_hops=1)
    email = signup(client)["email"]
    clinic = {"X-Forwarded-For": CLINIC}
    forged = {"X-Forwarded-For": f"{CLINIC}, {ATTACKER}"}  # the attacker's lie, then the proxy's
    assert _login(client, email, PASSWORD, PROXY, **clinic)[0] == 200
    for _ in range(3):
        assert _login(client, email, WRONG, PROXY, **forged)[:2] == (401, "invalid_credentials")
    assert _login(client, email, PASSWORD, PROXY, **forged)[:2] == (423, "account_locked")
    assert _login(client, email, PASSWORD, PROXY, **clinic)[0] == 200


@pytest.mark.parametrize(("days", "familiar"), [(89, True), (91, False)])
def test_an_address_stays_familiar_for_ninety_days_after_its_last_sign_in(
    client: FlaskClient, session: Session, days: int, familiar: bool
) -> None:
    """LIVERSCAN_LOGIN_FAMILIAR_DAYS (90): an address last signed in from longer ago is treated
    like any other, so a lockout of unfamiliar addresses covers it too."""
    email = signup(client)["email"]
    assert _login(client, email, PASSWORD, CLINIC)[0] == 200
    session.execute(update(LoginAddress).values(last_login_at=utcnow() - timedelta(days=days)))
    session.commit()
    for _ in range(3):
        assert _login(client, email, WRONG, ATTACKER)[0] == 401
    assert _login(client, email, PASSWORD, CLINIC)[0] == (200 if familiar else 423)


def test_a_stale_address_signing_in_again_is_familiar_again(
    client: FlaskClient, session: Session
) -> None:
    """Its sign-in counts as one from an unfamiliar address (it resets the email's shared count)
    and makes it familiar for another 90 days."""
    email = signup(client)["email"]
    assert _login(client, email, PASSWORD, CLINIC)[0] == 200
    session.execute(update(LoginAddress).values(last_login_at=utcnow() - timedelta(days=120)))
    session.commit()
    for _ in range(2):
        assert _login(client, email, WRONG, ATTACKER)[0] == 401
    assert _login(client, email, PASSWORD, CLINIC)[0] == 200
    for _ in range(3):
        assert _login(client, email, WRONG, ATTACKER)[0] == 401  # the shared count restarted
    assert _login(client, email, PASSWORD, ATTACKER)[:2] == (423, "account_locked")
    assert _login(client, email, PASSWORD, CLINIC)[0] == 200


def _lock_familiar_address_then_age_it(
    client: FlaskClient, session: Session, email: str, address: str
) -> None:
    """Sign in from `address`, lock it with 3 failures there, then let its familiarity lapse
    (last sign-in 91 days ago) while the 600 s lock still runs."""
    assert _login(client, email, PASSWORD, address)[0] == 200
    for _ in range(3):
        assert _login(client, email, WRONG, address)[0] == 401
    assert _login(client, email, PASSWORD, address)[:2] == (423, "account_locked")
    session.execute(update(LoginAddress).values(last_login_at=utcnow() - timedelta(days=91)))
    session.commit()


def test_a_lock_on_a_familiar_address_outlives_its_familiarity(
    client: FlaskClient, session: Session
) -> None:
    """An address locked when it stops being familiar (LIVERSCAN_LOGIN_FAMILIAR_DAYS) stays locked
    until its own lock ends: its guesses do not move to the email's shared count, which would
    give whoever guesses there a fresh set of tries at once. After the lock it counts like any
    other address."""
    email = signup(client)["email"]
    _lock_familiar_address_then_age_it(client, session, email, CLINIC)

    status, code, retry_after = _login(client, email, WRONG, CLINIC)
    assert (status, code) == (423, "account_locked") and 0 < int(retry_after) <= 600
    assert _login(client, email, PASSWORD, CLINIC)[:2] == (423, "account_locked")
    session.expire_all()
    assert session.scalars(select(LoginThrottle).where(LoginThrottle.email == email)).all() == []

    session.execute(update(LoginAddress).values(locked_until=utcnow() - timedelta(seconds=1)))
    session.commit()
    for _ in range(3):
        assert _login(client, email, WRONG, CLINIC)[0] == 401
    assert _login(client, email, PASSWORD, ATTACKER)[:2] == (423, "account_locked")  # shared


def test_a_stale_address_is_forgotten_only_once_its_lock_ended(
    client: FlaskClient, session: Session
) -> None:
    """accounts.forget_stale_addresses (the sweep) keeps a stale address while its lock runs:
    forgetting it would forget the lock."""
    email = signup(client)["email"]
    _lock_familiar_address_then_age_it(client, session, email, CLINIC)
    settings = client.application.extensions["liverscan"].settings

    assert accounts.forget_stale_addresses(session, settings) == 0
    session.commit()
    assert _login(client, email, PASSWORD, CLINIC)[:2] == (423, "account_locked")
    session.execute(update(LoginAddress).values(locked_until=utcnow() - timedelta(seconds=1)))
    assert accounts.forget_stale_addresses(session, settings) == 1


def test_stale_addresses_are_forgotten(client: FlaskClient, session: Session) -> None:
    """accounts.forget_stale_addresses (run by the sweep) deletes only addresses past the age."""
    email = signup(client)["email"]
    for address in (CLINIC, HOME):
        assert _login(client, email, PASSWORD, address)[0] == 200
    session.execute(
        update(LoginAddress)
        .where(LoginAddress.address == HOME)
        .values(last_login_at=utcnow() - timedelta(days=91))
    )
    settings = client.application.extensions["liverscan"].settings
    assert accounts.forget_stale_addresses(session, settings) == 1
    user_id = session.scalars(select(User.id).where(User.email == email)).one()
    rows = session.scalars(select(LoginAddress.address).where(LoginAddress.user_id == user_id))
    assert list(rows) == [CLINIC]


def test_only_the_last_ten_addresses_are_familiar(client: FlaskClient) -> None:
    email = signup(client)["email"]
    addresses = [f"192.0.2.{n}" for n in range(1, 12)]
    for address in addresses:
        assert _login(client, email, PASSWORD, address)[0] == 200
    for _ in range(3):
        assert _login(client, email, WRONG, ATTACKER)[0] == 401
    assert _login(client, email, PASSWORD, addresses[0])[:2] == (423, "account_locked")
    assert all(_login(client, email, PASSWORD, a)[0] == 200 for a in addresses[1:])


def test_two_first_logins_from_one_address_at_once_both_succeed(
    pg_url: str, tmp_path: Path
) -> None:
    """The second waits for the first's row on PostgreSQL, then uses it (no 500, one row)."""
    settings = base_settings(tmp_path, pg_url)
    engine = create_engine(pg_url)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    with factory() as setup:
        org = Organization(name="Race", webhook_secret="x")
        setup.add(org)
        setup.flush()
        email = f"race-{uuid.uuid4().hex[:8]}@clinic.test"
        user = User(org_id=org.id, email=email, name="R", password_hash="x", role=Role.ADMIN)
        setup.add(user)
        setup.commit()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with factory() as other:
                accounts.remember_address(other, settings, other.get_one(User, user.id), CLINIC)
                other.commit()
        except BaseException as exc:  # reported below
            errors.append(exc)

    try:
        with factory() as first:
            accounts.remember_address(first, settings, first.get_one(User, user.id), CLINIC)
            thread = threading.Thread(target=second)
            thread.start()
            thread.join(0.5)  # blocked on the first's uncommitted row
            first.commit()
        thread.join(10)
        assert errors == []
        with factory() as check:
            rows = check.scalars(select(LoginAddress).where(LoginAddress.user_id == user.id))
            assert [row.address for row in rows] == [CLINIC]
    finally:
        with factory() as cleanup:
            cleanup.execute(delete(LoginAddress).where(LoginAddress.user_id == user.id))
            cleanup.execute(delete(User).where(User.id == user.id))
            cleanup.execute(delete(Organization).where(Organization.id == org.id))
            cleanup.commit()
        engine.dispose()
