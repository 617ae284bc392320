"""Accounts: signup, password checks, login and token revocation (session first, flush only)."""

from __future__ import annotations

import logging
import re
import uuid
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import ForeignKey, Integer, String, delete, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from api.domain import audit, secrets
from api.domain.db import rows_deleted
from api.domain.errors import EmailTaken, InvalidCredentials, InvalidInput, WeakPassword
from api.domain.models import Base, Organization, RevokedToken, Role, User, UTCDateTime, utcnow
from api.domain.settings import Settings
from api.domain.webhooks import new_secret

log = logging.getLogger(__name__)

_EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 256
MAX_LOCKOUT_S = 24 * 3600
MAX_FAMILIAR_ADDRESSES = 10  # remembered sign-in addresses per user, most recent first
MAX_ADDRESS_LENGTH = 64  # an IPv6 address with a zone id fits


class LoginThrottle(Base):
    """Consecutive failed logins per email from addresses the account never signed in from
    (known email or not, so a lockout reveals no account)."""

    __tablename__ = "login_throttles"

    email: Mapped[str] = mapped_column(String(320), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Indexed: the sweep deletes stale rows by it (forget_stale_throttles).
    last_failure_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)


class LoginAddress(Base):
    """An address a user signed in from (the last MAX_FAMILIAR_ADDRESSES), with its own count of
    consecutive failed logins: a lockout there locks only that address for this user."""

    __tablename__ = "login_addresses"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    address: Mapped[str] = mapped_column(String(MAX_ADDRESS_LENGTH), primary_key=True)
    last_login_at: Mapped[datetime] = mapped_column(UTCDateTime)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_failure_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AccountLocked(InvalidCredentials):
    """Too many failed logins for this email from this address (a familiar one) or from unfamiliar
    addresses: refused, even with the right password, for a while."""

    code, http_status = "account_locked", 423
    message = "Too many failed logins; try again later."


def make_hasher(settings: Settings) -> PasswordHasher:
    """The argon2id hasher with the configured cost."""
    return PasswordHasher(
        time_cost=settings.password_hash_time_cost,
        memory_cost=settings.password_hash_memory_kib,
        parallelism=1,
    )


def check_password_strength(password: str) -> None:
    """Raise WeakPassword unless the password has ≥10 characters, a letter and a digit."""
    if (
        len(password) < MIN_PASSWORD_LENGTH
        or len(password) > MAX_PASSWORD_LENGTH
        or not re.search(r"[A-Za-z]", password)
        or not re.search(r"\d", password)
    ):
        raise WeakPassword(
            details={"min_length": MIN_PASSWORD_LENGTH, "requires": ["letter", "digit"]}
        )


def normalise_email(email: str) -> str:
    """Lower-cased, trimmed email, or InvalidInput if it does not look like one."""
    email = email.strip().lower()
    if not _EMAIL_RE.match(email) or len(email) > 320 or "\x00" in email:
        raise InvalidInput("The email address is invalid.", details={"field": "email"})
    return email


def signup(
    session: Session,
    hasher: PasswordHasher,
    *,
    settings: Settings,
    email: str,
    password: str,
    name: str,
    organization: str,
) -> User:
    """Create a new organization (its webhook secret sealed with ``settings``' key) and its first
    user, who is its admin."""
    email = normalise_email(email)
    check_password_strength(password)
    name, organization = name.strip(), organization.strip()
    if not name or len(name) > 200 or "\x00" in name:
        raise InvalidInput("A name (1-200 characters) is required.", details={"field": "name"})
    if not organization or len(organization) > 200 or "\x00" in organization:
        raise InvalidInput(
            "An organization name (1-200 characters) is required.",
            details={"field": "organization"},
        )
    if session.scalars(select(User.id).where(User.email == email)).first() is not None:
        raise EmailTaken(details={"field": "email"})
    org = Organization(name=organization, webhook_secret=secrets.seal(settings, new_secret()))
    session.add(org)
    session.flush()
    user = User(
        org_id=org.id, email=email, name=name, password_hash=hasher.hash(password), role=Role.ADMIN
    )
    session.add(user)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as exc:  # a concurrent signup won the race for this email
        raise EmailTaken(details={"field": "email"}) from exc
    audit.record(session, "signup", org_id=org.id, user_id=user.id)
    return user


def add_member(
    session: Session,
    hasher: PasswordHasher,
    *,
    org_id: uuid.UUID,
    email: str,
    password: str,
    name: str,
    role: Role,
    added_by: uuid.UUID | None,
) -> User:
    """Add a user to an existing organization (an admin's invitation; signup always creates an org)."""
    email = normalise_email(email)
    check_password_strength(password)
    name = name.strip()
    if not name or len(name) > 200 or "\x00" in name:
        raise InvalidInput("A name (1-200 characters) is required.", details={"field": "name"})
    if session.scalars(select(User.id).where(User.email == email)).first() is not None:
        raise EmailTaken(details={"field": "email"})
    user = User(
        org_id=org_id, email=email, name=name, password_hash=hasher.hash(password), role=role
    )
    session.add(user)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as exc:
        raise EmailTaken(details={"field": "email"}) from exc
    audit.record(
        session,
        "org.add_member",
        org_id=org_id,
        user_id=added_by,
        detail={"member": str(user.id), "role": role.value},
    )
    return user


def address_key(address: str | None) -> str:
    """The stored form of a client address (the key of its familiarity and its own lockout)."""
    return (address or "").replace("\x00", "").strip()[:MAX_ADDRESS_LENGTH] or "unknown"


def familiar_since(settings: Settings) -> datetime:
    """The oldest last sign-in that still makes an address familiar (LOGIN_FAMILIAR_DAYS ago)."""
    return utcnow() - timedelta(days=settings.login_familiar_days)


def remembered_address(session: Session, email: str, address: str | None) -> LoginAddress | None:
    """The account's remembered address (familiar or not any more), else None (also for unknown
    emails: one query either way)."""
    return session.scalars(
        select(LoginAddress)
        .join(User, User.id == LoginAddress.user_id)
        .where(User.email == _email_key(email), LoginAddress.address == address_key(address))
    ).one_or_none()


def _counter(
    session: Session, settings: Settings, email: str, address: str | None
) -> LoginAddress | LoginThrottle | None:
    """The failure count that governs a login from `address`: the address's own while it is
    familiar, or while a lock it earned still runs (its familiarity lapsing mid-lock must not
    move its guesses to the shared count, a fresh set of tries); else the email's count shared by
    every unfamiliar address."""
    row = remembered_address(session, email, address)
    if row is not None and (row.last_login_at >= familiar_since(settings) or _locked(row)):
        return row
    return session.get(LoginThrottle, _email_key(email))


def _locked(counter: LoginAddress | LoginThrottle) -> bool:
    """Whether this count's lock still runs."""
    return counter.locked_until is not None and counter.locked_until > utcnow()


def check_not_locked(session: Session, settings: Settings, email: str, address: str | None) -> None:
    """Raise AccountLocked (details.retry_after_s) while logins for this email from this address
    are locked out."""
    counter = _counter(session, settings, email, address)
    if counter is None or counter.locked_until is None:
        return
    remaining = (counter.locked_until - utcnow()).total_seconds()
    if remaining > 0:
        raise AccountLocked(details={"retry_after_s": max(1, int(remaining + 0.999))})


def record_failed_login(
    session: Session, settings: Settings, email: str, address: str | None
) -> LoginAddress | LoginThrottle:
    """Count a failed login against the familiar address it came from, else against the email's
    unfamiliar addresses; from the max-th on, lock for lockout_s doubled per extra failure."""
    counter = _counter(session, settings, email, address)
    if counter is None:
        counter = LoginThrottle(email=_email_key(email), failures=0)
        session.add(counter)
    now = utcnow()
    counter.failures = (counter.failures or 0) + 1
    counter.last_failure_at = now
    extra = counter.failures - settings.login_max_failures
    if extra >= 0:
        seconds = min(settings.login_lockout_s * 2 ** min(extra, 20), MAX_LOCKOUT_S)
        counter.locked_until = now + timedelta(seconds=seconds)
        scope = (
            "a familiar address" if isinstance(counter, LoginAddress) else "unfamiliar addresses"
        )
        log.warning(
            "login locked from %s for %d s after %d failures", scope, seconds, counter.failures
        )
    session.flush()
    return counter


def clear_failed_logins(session: Session, email: str) -> None:
    """Forget the email's failed-login count from unfamiliar addresses."""
    session.execute(delete(LoginThrottle).where(LoginThrottle.email == _email_key(email)))


def remember_address(
    session: Session, settings: Settings, user: User, address: str | None
) -> LoginAddress:
    """Record a successful login from `address`: it becomes (or stays) familiar with its count
    reset; only the MAX_FAMILIAR_ADDRESSES most recently used are kept. A success from an
    unfamiliar address (one never used, or not within LOGIN_FAMILIAR_DAYS) also resets the email's
    unfamiliar-address count (as before smart lockout); one from a familiar address leaves it
    alone, so a clinician's logins never hand whoever is guessing from elsewhere a fresh set of
    tries."""
    key, now = address_key(address), utcnow()
    row = session.get(LoginAddress, (user.id, key))
    if row is None or row.last_login_at < familiar_since(settings):
        clear_failed_logins(session, user.email)
    if row is None:
        row = LoginAddress(user_id=user.id, address=key, last_login_at=now, failures=0)
        try:
            with session.begin_nested():
                session.add(row)
                session.flush()
        except IntegrityError:  # a concurrent login from the same address added it first
            row = session.get_one(LoginAddress, (user.id, key))
    row.last_login_at, row.failures, row.locked_until = now, 0, None
    session.flush()
    stale = session.scalars(
        select(LoginAddress.address)
        .where(LoginAddress.user_id == user.id)
        .order_by(LoginAddress.last_login_at.desc(), LoginAddress.address)
        .offset(MAX_FAMILIAR_ADDRESSES)
    ).all()
    if stale:
        session.execute(
            delete(LoginAddress).where(
                LoginAddress.user_id == user.id, LoginAddress.address.in_(stale)
            )
        )
    return row


def throttle_forget_after(settings: Settings) -> timedelta:
    """How long an email's count of failed logins from unfamiliar addresses is kept after its last
    failure and the end of its last lock: LOGIN_FAMILIAR_DAYS, and never less than a day per
    guess that a fresh count and its doubling locks allow before they reach the day-long cap, so
    waiting for the count to be forgotten never yields more guesses than one a day."""
    fresh_guesses = settings.login_max_failures + _doublings_to_cap(settings)
    return max(
        timedelta(days=settings.login_familiar_days),
        timedelta(seconds=MAX_LOCKOUT_S) * (fresh_guesses + 1),
    )


def _doublings_to_cap(settings: Settings) -> int:
    """Locks after the first that are shorter than MAX_LOCKOUT_S (each one guess apart)."""
    doublings, seconds = 0, settings.login_lockout_s
    while seconds < MAX_LOCKOUT_S:
        doublings, seconds = doublings + 1, seconds * 2
    return doublings


def forget_stale_throttles(session: Session, settings: Settings) -> int:
    """Delete counts of failed logins from unfamiliar addresses (known emails or not) with no
    failure and no lock within `throttle_forget_after`; a running lock, or one that ended
    recently (the next failure doubles it), stays. Returns how many."""
    cutoff = utcnow() - throttle_forget_after(settings)
    result = session.execute(
        delete(LoginThrottle).where(
            LoginThrottle.last_failure_at < cutoff,
            or_(LoginThrottle.locked_until.is_(None), LoginThrottle.locked_until < cutoff),
        )
    )
    return rows_deleted(result)


def forget_stale_addresses(session: Session, settings: Settings) -> int:
    """Delete remembered addresses not signed in from within LOGIN_FAMILIAR_DAYS (no longer
    familiar anyway) once no lock of theirs runs (forgetting one would forget its lock); returns
    how many."""
    result = session.execute(
        delete(LoginAddress).where(
            LoginAddress.last_login_at < familiar_since(settings),
            or_(LoginAddress.locked_until.is_(None), LoginAddress.locked_until <= utcnow()),
        )
    )
    return rows_deleted(result)


def authenticate(
    session: Session,
    hasher: PasswordHasher,
    *,
    settings: Settings,
    email: str,
    password: str,
    address: str | None,
) -> User:
    """The user with these credentials, else InvalidCredentials (same answer for unknown emails);
    AccountLocked while logins for the email from `address` (the client's address) are locked
    out (the caller records failures and commits them)."""
    if "\x00" in email:  # no account has one (signup refuses it), and PostgreSQL cannot compare it
        raise InvalidCredentials()
    check_not_locked(session, settings, email, address)
    user = session.scalars(select(User).where(User.email == _email_key(email))).one_or_none()
    if user is None:
        # Spend the same time as a real check so response times do not reveal which emails exist.
        try:
            hasher.verify(_dummy_hash(hasher), password + "x")
        except (VerificationError, InvalidHashError):
            pass
        raise InvalidCredentials()
    try:
        hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError) as exc:
        raise InvalidCredentials() from exc
    if hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hasher.hash(password)
    remember_address(session, settings, user, address)
    audit.record(session, "login", org_id=user.org_id, user_id=user.id)
    return user


def _email_key(email: str) -> str:
    return email.strip().lower()[:320].replace("\x00", "")


_DUMMY: dict[tuple[int, int], str] = {}


def _dummy_hash(hasher: PasswordHasher) -> str:
    key = (hasher.time_cost, hasher.memory_cost)
    if key not in _DUMMY:
        _DUMMY[key] = hasher.hash("not-a-real-password-0")
    return _DUMMY[key]


def get_user(session: Session, user_id: uuid.UUID) -> User | None:
    """The user with this id, or None."""
    return session.get(User, user_id)


def revoke_token(
    session: Session, *, jti: str, token_type: str, user_id: uuid.UUID | None, expires_at: datetime
) -> None:
    """Record a token id as revoked until it would have expired anyway (idempotent)."""
    if session.get(RevokedToken, jti) is None:
        session.add(
            RevokedToken(jti=jti, token_type=token_type, user_id=user_id, expires_at=expires_at)
        )
        session.flush()


def is_token_revoked(session: Session, jti: str) -> bool:
    """Whether this token id was revoked."""
    return session.get(RevokedToken, jti) is not None


def purge_expired_revocations(session: Session) -> int:
    """Delete revocations of tokens that have expired anyway; returns how many."""
    result = session.execute(delete(RevokedToken).where(RevokedToken.expires_at < utcnow()))
    return rows_deleted(result)
