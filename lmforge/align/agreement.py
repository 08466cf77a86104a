"""Agreement between raters of the same pairs: Cohen's κ and raw agreement, pairwise over preference files.

    lmforge prefs agreement prefs/me.jsonl prefs/you.jsonl prefs/judge.jsonl

Records of different files are the same pair when (prompt_index, seed_a, seed_b) match, so raters must collect
with the same prompts and seeds. Only labels a, b, tie and both_bad count; a skip or no label (an unparseable
judge) is left out of both the κ and the raw agreement.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import ConfigError

from .preferences import read_records

__all__ = ["KAPPA_CATEGORIES", "Agreement", "agreement", "cohens_kappa", "format_agreement"]

KAPPA_CATEGORIES = ("a", "b", "tie", "both_bad")  # what agreement counts; skip and no label are left out


def cohens_kappa(labels_1: Sequence, labels_2: Sequence, categories: Sequence = KAPPA_CATEGORIES) -> float:
    """Cohen's κ = (p_o − p_e) / (1 − p_e) over the items both raters put in `categories` (Cohen 1960); NaN
    when no item qualifies, or when both raters used one and the same category throughout (p_e = 1)."""
    both = [(x, y) for x, y in zip(labels_1, labels_2, strict=True) if x in categories and y in categories]
    n = len(both)
    if n == 0:
        return math.nan
    observed = sum(x == y for x, y in both) / n
    first, second = Counter(x for x, _ in both), Counter(y for _, y in both)
    expected = sum(first[c] * second[c] for c in categories) / (n * n)
    return math.nan if expected == 1 else (observed - expected) / (1 - expected)


@dataclass
class Agreement:
    file_1: str
    file_2: str
    overlap: int  # pairs (prompt_index, seed_a, seed_b) in both files
    labelled: int  # of those, labelled a / b / tie / both_bad by both
    agreed: int
    kappa: float

    @property
    def raw(self) -> float:
        return self.agreed / self.labelled if self.labelled else math.nan


def agreement(paths: Sequence[str | Path]) -> list[Agreement]:
    """Pairwise agreement of rater files; records are matched by (prompt_index, seed_a, seed_b)."""
    if len(paths) < 2:
        raise ConfigError("agreement needs at least two preference files")
    keyed = {}
    for path in paths:
        keyed[str(path)] = {(r.prompt_index, r.seed_a, r.seed_b): r.label for r in read_records(path)}
    results = []
    for (name_1, one), (name_2, two) in itertools.combinations(keyed.items(), 2):
        common = sorted(one.keys() & two.keys())
        l1, l2 = [one[k] for k in common], [two[k] for k in common]
        both = [(x, y) for x, y in zip(l1, l2) if x in KAPPA_CATEGORIES and y in KAPPA_CATEGORIES]
        results.append(Agreement(name_1, name_2, len(common), len(both), sum(x == y for x, y in both),
                                 cohens_kappa(l1, l2)))  # fmt: skip
    return results


def format_agreement(results: Sequence[Agreement]) -> str:
    lines = []
    for r in results:
        kappa = "n/a" if math.isnan(r.kappa) else f"{r.kappa:.3f}"
        raw = "n/a" if not r.labelled else f"{r.raw:.3f} ({r.agreed}/{r.labelled})"
        lines.append(f"{r.file_1} vs {r.file_2}: {r.overlap} pairs in both, {r.labelled} labelled by both; "
                     f"agreement {raw}; Cohen's kappa {kappa}")  # fmt: skip
    return "\n".join(lines)
