"""Inline SVG charts rendered on the server from plain numbers (no JavaScript, no CDN)."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

_W, _H, _PAD = 320, 320, 40


def _fmt(v: float) -> str:
    return f"{v:.1f}"


def _axes(title: str, x_label: str, y_label: str) -> list[str]:
    """Frame, unit ticks and axis labels for a square [0, 1] x [0, 1] plot."""
    inner = _W - 2 * _PAD
    parts = [
        f'<rect x="{_PAD}" y="{_PAD}" width="{inner}" height="{inner}" class="chart-frame"/>',
    ]
    for i in range(6):
        t = i / 5
        x = _PAD + t * inner
        y = _H - _PAD - t * inner
        parts.append(
            f'<line x1="{_fmt(x)}" y1="{_H - _PAD}" x2="{_fmt(x)}" y2="{_H - _PAD + 4}" class="chart-tick"/>'
        )
        parts.append(
            f'<text x="{_fmt(x)}" y="{_H - _PAD + 16}" class="chart-label" text-anchor="middle">{t:.1f}</text>'
        )
        parts.append(
            f'<line x1="{_PAD - 4}" y1="{_fmt(y)}" x2="{_PAD}" y2="{_fmt(y)}" class="chart-tick"/>'
        )
        parts.append(
            f'<text x="{_PAD - 6}" y="{_fmt(y + 4)}" class="chart-label" text-anchor="end">{t:.1f}</text>'
        )
    parts.append(
        f'<text x="{_W / 2}" y="{_H - 6}" class="chart-label" text-anchor="middle">{escape(x_label)}</text>'
    )
    parts.append(
        f'<text x="12" y="{_H / 2}" class="chart-label" text-anchor="middle" '
        f'transform="rotate(-90 12 {_H / 2})">{escape(y_label)}</text>'
    )
    parts.append(
        f'<text x="{_W / 2}" y="{_PAD - 12}" class="chart-title" text-anchor="middle">{escape(title)}</text>'
    )
    return parts


def _xy(x: float, y: float) -> tuple[float, float]:
    inner = _W - 2 * _PAD
    cx = min(max(x, 0.0), 1.0)
    cy = min(max(y, 0.0), 1.0)
    return _PAD + cx * inner, _H - _PAD - cy * inner


def _svg(parts: list[str], label: str) -> Markup:
    body = "".join(parts)
    return Markup(
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(label)}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{escape(label)}</title>{body}</svg>'
    )


def roc_svg(fpr: Sequence[float], tpr: Sequence[float], auc: float | None = None) -> Markup:
    """Render a ROC curve (false-positive rate vs true-positive rate, both in [0, 1]) as SVG."""
    title = "ROC curve" + (f" (AUC {auc:.3f})" if auc is not None else "")
    parts = _axes(
        title, "False-positive rate (1 - specificity)", "True-positive rate (sensitivity)"
    )
    x0, y0 = _xy(0, 0)
    x1, y1 = _xy(1, 1)
    parts.append(
        f'<line x1="{_fmt(x0)}" y1="{_fmt(y0)}" x2="{_fmt(x1)}" y2="{_fmt(y1)}" class="chart-diagonal"/>'
    )
    points = " ".join(
        f"{_fmt(px)},{_fmt(py)}"
        for px, py in (_xy(float(a), float(b)) for a, b in zip(fpr, tpr, strict=False))
    )
    if points:
        parts.append(f'<polyline points="{points}" class="chart-line"/>')
    return _svg(parts, title)


def reliability_svg(
    confidence: Sequence[float],
    observed: Sequence[float],
    counts: Sequence[int] | None = None,
    ece: float | None = None,
) -> Markup:
    """Render a reliability diagram: mean predicted probability per bin vs observed tumor rate."""
    title = "Reliability" + (f" (ECE {ece:.3f})" if ece is not None else "")
    parts = _axes(title, "Predicted probability of tumor", "Observed share of tumors")
    x0, y0 = _xy(0, 0)
    x1, y1 = _xy(1, 1)
    parts.append(
        f'<line x1="{_fmt(x0)}" y1="{_fmt(y0)}" x2="{_fmt(x1)}" y2="{_fmt(y1)}" class="chart-diagonal"/>'
    )
    pts = [(float(c), float(o)) for c, o in zip(confidence, observed, strict=False)]
    if pts:
        parts.append(
            '<polyline points="'
            + " ".join(f"{_fmt(a)},{_fmt(b)}" for a, b in (_xy(c, o) for c, o in pts))
            + '" class="chart-line"/>'
        )
    for i, (c, o) in enumerate(pts):
        px, py = _xy(c, o)
        n = f" (n={int(counts[i])})" if counts is not None and i < len(counts) else ""
        parts.append(
            f'<circle cx="{_fmt(px)}" cy="{_fmt(py)}" r="4" class="chart-point"><title>predicted {c:.2f}, observed {o:.2f}{n}</title></circle>'
        )
    return _svg(parts, title)


def bar_svg(labels: Sequence[str], values: Sequence[float], title: str) -> Markup:
    """Render a simple vertical bar chart (e.g. jobs per day) as SVG."""
    width, height, pad = 560, 220, 36
    n = max(len(values), 1)
    top = max([float(v) for v in values] + [1.0])
    slot = (width - 2 * pad) / n
    parts = [
        f'<text x="{width / 2}" y="16" class="chart-title" text-anchor="middle">{escape(title)}</text>'
    ]
    parts.append(
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" class="chart-tick"/>'
    )
    for i, (lab, v) in enumerate(zip(labels, values, strict=False)):
        h = (height - 2 * pad) * float(v) / top
        x = pad + i * slot + slot * 0.15
        y = height - pad - h
        parts.append(
            f'<rect x="{_fmt(x)}" y="{_fmt(y)}" width="{_fmt(slot * 0.7)}" height="{_fmt(h)}" class="chart-bar"><title>{escape(lab)}: {v:g}</title></rect>'
        )
        parts.append(
            f'<text x="{_fmt(x + slot * 0.35)}" y="{_fmt(y - 4)}" class="chart-label" text-anchor="middle">{v:g}</text>'
        )
        if n <= 14 or i % max(n // 7, 1) == 0:
            parts.append(
                f'<text x="{_fmt(x + slot * 0.35)}" y="{height - pad + 14}" class="chart-label" text-anchor="middle">{escape(lab[5:] if len(lab) == 10 else lab)}</text>'
            )
    return Markup(
        f'<svg class="chart chart-wide" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>{"".join(parts)}</svg>'
    )
