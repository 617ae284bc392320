"""The sweep forgets sign-in addresses that are no longer familiar (LIVERSCAN_LOGIN_FAMILIAR_DAYS)."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import select

from api.domain import accounts
from api.domain.accounts import LoginAddress
from api.domain.models import utcnow
from worker import sweep
from worker.context import WorkerContext


def test_sweep_forgets_sign_in_addresses_past_the_familiar_age(ctx: WorkerContext) -> None:
    """A user's address last signed in from over LIVERSCAN_LOGIN_FAMILIAR_DAYS ago is deleted;
    a recent one stays."""
    old = utcnow() - timedelta(days=ctx.settings.login_familiar_days, hours=1)
    with ctx.sessions.begin() as session:
        user_id = accounts.signup(
            session,
            accounts.make_hasher(ctx.settings),
            settings=ctx.settings,
            email=f"roaming-{uuid.uuid4().hex[:8]}@clinic.test",
            password="correct-horse-42",
            name="Dr Roaming",
            organization="Roaming clinic",
        ).id
        for address, last in (("198.51.100.10", utcnow()), ("203.0.113.9", old)):
            session.add(LoginAddress(user_id=user_id, address=address, last_login_at=last))

    sweep.run(context=ctx)
    with ctx.sessions() as session:
        rows = session.scalars(select(LoginAddress.address).where(LoginAddress.user_id == user_id))
        assert list(rows) == ["198.51.100.10"]
