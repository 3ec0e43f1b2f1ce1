"""The statistics of `scratchpad eval`: pure functions of per-sample verdicts, no Ray, no models.

A prompt's samples arrive as lists in sampling order: `correct` (the accuracy component's 0/1 verdicts), `answers`
(the parsed answers, None where a completion has no answer block) and `scores` (the rerank component's values).
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from statistics import NormalDist

from scratchpad.rewards.checkers import normalise

Z95 = NormalDist().inv_cdf(0.975)  # 1.959963...


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (default 95%) for a proportion successes / n; (0, 1) when n is 0. `successes` may be
    fractional (a mean of per-prompt estimates in [0, 1] times n): such a mean's variance is at most p(1 - p) / n,
    so the interval is then conservative."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021)'s unbiased estimate of P(at least one of k samples is correct) from c correct out of n:
    1 - C(n-c, k) / C(n, k), as a product of ratios (the binomials themselves overflow floats for large n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / m for m in range(n - c + 1, n + 1))


def majority_correct(answers: list[str | None], correct: list[float], k: int) -> float:
    """maj@k: 1 if the most frequent answer among the first k samples (normalised like the exact checker) is correct.
    Samples without an answer do not vote; a tie goes to the answer that appeared first. The voted answer counts as
    correct when a sample that gave it passed the accuracy check (they differ only in what surrounds the answer)."""
    votes: Counter[str] = Counter()
    first: dict[str, int] = {}
    right: dict[str, bool] = defaultdict(bool)
    for i, (answer, ok) in enumerate(zip(answers[:k], correct[:k])):
        if answer is None:
            continue
        key = normalise(answer)
        votes[key] += 1
        first.setdefault(key, i)
        right[key] |= ok > 0
    if not votes:
        return 0.0
    winner = max(votes, key=lambda a: (votes[a], -first[a]))
    return float(right[winner])


def best_of_correct(scores: list[float], correct: list[float], k: int) -> float:
    """best-of-k: the verdict of the sample with the highest rerank score among the first k (the first such on a tie)."""
    head = scores[:k]
    pick = max(range(len(head)), key=lambda i: (head[i], -i))
    return float(correct[pick] > 0)


def proportion(values: list[float]) -> dict:
    """Mean of per-prompt values in [0, 1] with its n and 95% Wilson interval."""
    n = len(values)
    total = float(sum(values))
    low, high = wilson(total, n)
    return {"accuracy": total / n if n else None, "n": n, "low": low, "high": high}


def length_order(key: str) -> tuple:
    """Sort key for length labels: numbers in numeric order ("9" before "10"), then any others."""
    return (0, int(key), "") if key.lstrip("-").isdigit() else (1, 0, key)


def by_length(values: list[float], lengths: list) -> dict:
    """`proportion` overall and for each task length (meta["length"]; "all" where a task has none)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for v, length in zip(values, lengths):
        groups[str(length)].append(v)
    return {"overall": proportion(values),
            "by_length": {key: proportion(groups[key]) for key in sorted(groups, key=length_order)}}


def sampled_metrics(prompts: list[dict], ks: list[int]) -> dict[str, list[float]]:
    """Per-prompt values of pass@1 and, for each k, pass@k, maj@k and best@k. Each prompt is
    {"correct": [...], "answers": [...], "scores": [...]}, all of one length n >= max(ks)."""
    ks = sorted(set(ks))
    out: dict[str, list[float]] = {name: [] for k in ks for name in (f"pass@{k}", f"maj@{k}", f"best@{k}")}
    out.setdefault("pass@1", [])
    for p in prompts:
        n, c = len(p["correct"]), int(sum(v > 0 for v in p["correct"]))
        if 1 not in ks:
            out["pass@1"].append(c / n)
        for k in ks:
            out[f"pass@{k}"].append(pass_at_k(n, c, k))
            out[f"maj@{k}"].append(majority_correct(p["answers"], p["correct"], k))
            out[f"best@{k}"].append(best_of_correct(p["scores"], p["correct"], k))
    return out
