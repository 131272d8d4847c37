"""The statistics a reviewer asks of an accuracy comparison: intervals, the paired difference, McNemar's test.

Reference and candidate answer the same images, so their accuracies are paired: the difference is judged by the
images whose answer changed (right to wrong, wrong to right), not by two independent intervals. Intervals are 95%:
Wilson's score interval for a proportion (Wilson 1927; right at 0% and 100%, where the normal one is not),
Newcombe's hybrid score interval for a paired difference (Newcombe 1998, "Improved confidence intervals for the
difference between binomial proportions based on paired data", method 10), and McNemar's exact test (the two-sided
binomial test of the changed answers at one half).
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
#: Classes listed by how much their accuracy fell (``per_class_drops``).
WORST_CLASSES = 5


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of ``successes / trials``; (0, 1) with no trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(both: int, lost: int, gained: int, neither: int, z: float = Z95) -> tuple[float, float, float]:
    """The reference's accuracy less the candidate's, with Newcombe's interval (method 10).

    ``both``: right in both; ``lost``: right in the reference only; ``gained``: right in the candidate only;
    ``neither``: wrong in both. Returns (difference, lower, upper) as fractions.
    """
    n = both + lost + gained + neither
    if n == 0:
        return 0.0, -1.0, 1.0
    p1, p2 = (both + lost) / n, (both + gained) / n
    l1, u1 = wilson(both + lost, n, z)
    l2, u2 = wilson(both + gained, n, z)
    margins = (both + lost) * (gained + neither) * (both + gained) * (lost + neither)
    phi = (both * neither - lost * gained) / math.sqrt(margins) if margins else 0.0
    lower = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    difference = p1 - p2
    return difference, max(-1.0, difference - lower), min(1.0, difference + upper)


def mcnemar_exact(lost: int, gained: int) -> float:
    """McNemar's exact two-sided p-value: how likely so uneven a split of the changed answers is by chance."""
    changed = lost + gained
    if changed == 0:
        return 1.0
    # the binomial tail in logarithms: a validation set's counts overflow floats, and exact integers take minutes
    logs = [math.lgamma(changed + 1) - math.lgamma(k + 1) - math.lgamma(changed - k + 1) - changed * math.log(2)
            for k in range(min(lost, gained) + 1)]
    top = max(logs)
    return min(1.0, 2 * math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


def accuracy_statistics(reference_right: np.ndarray, candidate_right: np.ndarray) -> dict:
    """Accuracies with intervals, the paired drop (points) with its interval, the changed answers each way and
    McNemar's p-value, from two boolean arrays (one entry per image)."""
    n = len(reference_right)
    ref, cand = np.asarray(reference_right, bool), np.asarray(candidate_right, bool)
    both, lost = int(np.sum(ref & cand)), int(np.sum(ref & ~cand))
    gained, neither = int(np.sum(~ref & cand)), int(np.sum(~ref & ~cand))
    drop, low, high = paired_difference(both, lost, gained, neither)
    return {
        "images": n,
        "accuracy_reference_ci95": list(wilson(both + lost, n)),
        "accuracy_candidate_ci95": list(wilson(both + gained, n)),
        "accuracy_drop_points_ci95": [100 * low, 100 * high],
        "right_to_wrong": lost,
        "wrong_to_right": gained,
        "mcnemar_p": mcnemar_exact(lost, gained),
    }


def agreement_interval(agreeing: int, n: int) -> list[float]:
    """Top-1 agreement's Wilson interval, for comparisons without labels."""
    return list(wilson(agreeing, n))


def per_class_drops(labels: np.ndarray, reference_right: np.ndarray, candidate_right: np.ndarray,
                    names: list[str] | None = None, count: int = WORST_CLASSES) -> list[dict]:
    """The ``count`` classes whose accuracy fell the most (points), with their images and both accuracies; classes
    that did not fall are left out."""
    rows = []
    for label in np.unique(labels):
        mine = labels == label
        n = int(mine.sum())
        ref, cand = float(reference_right[mine].mean()), float(candidate_right[mine].mean())
        if cand < ref:
            name = names[label] if names and 0 <= label < len(names) else None
            rows.append({"class": int(label), "name": name, "images": n, "accuracy_reference": ref,
                         "accuracy_candidate": cand, "drop_points": 100 * (ref - cand)})
    rows.sort(key=lambda r: (-r["drop_points"], r["class"]))
    return rows[:count]


def describe_statistics(metrics: dict) -> str:
    """The statistics of ``metrics`` (``verify.compare``'s) in words, or "" when it has none."""
    s = metrics.get("statistics")
    if not s:
        return ""
    if "accuracy_drop_points_ci95" in s:
        low, high = s["accuracy_drop_points_ci95"]
        return (f"accuracy drop {metrics['accuracy_drop_points']:.2f} points (95% CI {low:.2f} to {high:.2f}), "
                f"{s['right_to_wrong']} right->wrong, {s['wrong_to_right']} wrong->right, McNemar p={s['mcnemar_p']:.3g}")
    low, high = s["top1_agreement_ci95"]
    return f"top-1 agreement 95% CI {low:.1%} to {high:.1%}"
