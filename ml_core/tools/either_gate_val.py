"""An EitherGate artifact on the gate CLI's validation groups: the union and each gate alone.

Validation only (``GatePools("val", <the artifact's first localiser>, seed=1, shrink=4096)``,
``evaluation_set(seed=101)``, as ``python -m ml_core.gate`` scores its candidates). Prints one
JSON line per gate: liver accepted, counted negatives rejected, whether every counted window/format
group is accepted >= 0.99, the worst group, far slices rejected, and the negative-file groups.

Usage: python -m ml_core.tools.either_gate_val ml_core/models/liverscan-lite0-0.5.8
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any


def scan(folder: str) -> dict[str, Any]:
    """The figures of the union and of each of its gates (see the module docstring)."""
    from ml_core import gate as G
    from ml_core.classifier import Classifier

    union = Classifier.load(folder).gate()
    if not isinstance(union, G.EitherGate):
        raise SystemExit(f"{folder} has no gate_either/: not an EitherGate artifact")
    groups = G.evaluation_set(G.GatePools("val", union.localiser, seed=1, shrink=4096), seed=101)
    out: dict[str, Any] = {}
    for name, g in (("union", union), ("first", union.first), ("either", union.other)):
        g.clear_caches()
        scores = G.score_groups(g, groups)
        r = G.rates(scores, g.threshold)
        by = r["by_group"]
        counted_pos = [(v["accepted"], k) for k, v in by.items() if G._counted_positive(k)]
        out[name] = {
            "threshold": g.threshold,
            "liver_accepted": r["liver_accepted"],
            "negatives_rejected": r["negatives_rejected"],
            "every_group_0.99": G.every_group_accepted(scores, g.threshold),
            "worst_positive_group": min(counted_pos),
            "far_slices_rejected": by.get("neg/far_slices", {}).get("rejected"),
            "negative_groups_not_all_rejected": {
                k: v for k, v in by.items() if G._counted_negative(k) and v["rejected"] < 1.0
            },
            "files": {k: v for k, v in by.items() if "files" in k},
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print one JSON line per gate."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    for name, figures in scan(args[0]).items():
        print(name, json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
