"""Live operational figures for the performance page, scoped to one organization."""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.domain.models import TERMINAL_STATUSES, Job, JobStatus, utcnow

MAX_ROWS = 100_000


@dataclass
class LiveFigures:
    """Jobs per day, time to result and rejections over a recent window."""

    days: int
    total: int = 0
    finished: int = 0
    rejected: int = 0
    per_day: list[tuple[str, int]] = field(default_factory=list)
    median_s: float | None = None
    p95_s: float | None = None
    reasons: list[tuple[str, int]] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) of values by linear interpolation; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def live_figures(
    session: Session, org_id: uuid.UUID, *, days: int = 14, now: datetime | None = None
) -> LiveFigures:
    """Compute the organization's figures over the last `days` days (another org is never counted)."""
    now = now or utcnow()
    since = (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    rows = session.execute(
        select(Job.created_at, Job.finished_at, Job.status, Job.reason_code)
        .where(Job.org_id == org_id, Job.created_at >= since)
        .limit(MAX_ROWS)
    ).all()
    figures = LiveFigures(days=days, total=len(rows))
    per_day: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    durations: list[float] = []
    for created, finished, status, reason in rows:
        per_day[created.date().isoformat()] += 1
        if status in TERMINAL_STATUSES:
            figures.finished += 1
            if finished is not None:
                durations.append(max((finished - created).total_seconds(), 0.0))
        if status == JobStatus.REJECTED:
            figures.rejected += 1
            reasons[reason or "unknown"] += 1
    figures.per_day = [
        (
            (since + timedelta(days=i)).date().isoformat(),
            per_day.get((since + timedelta(days=i)).date().isoformat(), 0),
        )
        for i in range(days)
    ]
    figures.median_s = percentile(durations, 50)
    figures.p95_s = percentile(durations, 95)
    figures.reasons = reasons.most_common()
    return figures
