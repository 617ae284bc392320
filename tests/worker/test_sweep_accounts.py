"""The sweep deletes what the sign-in tables no longer need: revocations of tokens past their own
expiry, and failed-login counts quiet for long (never a running lock)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from api.domain import accounts
from api.domain.accounts import AccountLocked, LoginThrottle
from api.domain.models import RevokedToken, utcnow
from worker import sweep
from worker.context import WorkerContext


def _email(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}@clinic.test"


def test_sweep_deletes_revocations_of_expired_tokens_only(ctx: WorkerContext) -> None:
    """A revocation outlives nothing: once its token expired (and is refused as expired anyway)
    the row goes; a token still valid stays revoked."""
    expired, live = uuid.uuid4().hex, uuid.uuid4().hex
    with ctx.sessions.begin() as session:
        for jti, expires_at in (
            (expired, utcnow() - timedelta(seconds=1)),
            (live, utcnow() + timedelta(hours=1)),
        ):
            accounts.revoke_token(
                session, jti=jti, token_type="refresh", user_id=None, expires_at=expires_at
            )

    sweep.run(context=ctx)
    with ctx.sessions() as session:
        kept = session.scalars(
            select(RevokedToken.jti).where(RevokedToken.jti.in_([expired, live]))
        )
        assert list(kept) == [live]
        assert accounts.is_token_revoked(session, live)


def test_sweep_forgets_failed_login_counts_quiet_past_their_expiry_only(
    ctx: WorkerContext,
) -> None:
    """Counts (known email or not) with no failure and no lock for the forget period go; a recent
    count, a lock that ended recently (it still doubles the next one) and a running lock stay."""
    settings = ctx.settings
    quiet = accounts.throttle_forget_after(settings)
    now = utcnow()
    stale, stale_locked = _email("stale"), _email("stale-locked")
    recent, ended, locked = _email("recent"), _email("lock-ended"), _email("locked")
    rows = {
        stale: (2, None, now - quiet - timedelta(hours=1)),
        stale_locked: (9, now - quiet - timedelta(minutes=1), now - quiet - timedelta(hours=2)),
        recent: (2, None, now - timedelta(hours=1)),
        ended: (6, now - timedelta(minutes=5), now - timedelta(minutes=35)),
        locked: (5, now + timedelta(minutes=10), now - timedelta(minutes=5)),
    }
    with ctx.sessions.begin() as session:
        for email, (failures, locked_until, last_failure_at) in rows.items():
            session.add(
                LoginThrottle(
                    email=email,
                    failures=failures,
                    locked_until=locked_until,
                    last_failure_at=last_failure_at,
                )
            )

    sweep.run(context=ctx)
    with ctx.sessions() as session:
        kept = session.scalars(select(LoginThrottle.email).where(LoginThrottle.email.in_(rows)))
        assert set(kept) == {recent, ended, locked}
        # Forgetting the ended lock's count would hand a guesser 5 fresh tries; it doubles instead.
        counter = accounts.record_failed_login(session, settings, ended, "203.0.113.7")
        assert counter.failures == 7


def test_a_locked_email_stays_locked_across_a_sweep(ctx: WorkerContext) -> None:
    """Failed logins that locked an email (unknown here, so nothing tells it from a real one)
    keep it locked after a sweep, with the same Retry-After."""
    settings = ctx.settings
    email = _email("guessed")
    with ctx.sessions.begin() as session:
        for _ in range(settings.login_max_failures):
            accounts.record_failed_login(session, settings, email, "198.51.100.23")

    sweep.run(context=ctx)
    with ctx.sessions() as session, pytest.raises(AccountLocked) as info:
        accounts.check_not_locked(session, settings, email, "198.51.100.23")
    assert info.value.code == "account_locked"
    assert 0 < info.value.details["retry_after_s"] <= settings.login_lockout_s
