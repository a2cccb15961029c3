"""Sparse probing's tasks, sized and balanced as SAEBench 0.6 builds them.

Sizes mean what they mean in SAEBench: each one-vs-rest task trains on `n_train` texts and tests on
`n_test`, half of them positives. So every class contributes n_train/2 training and n_test/2 test texts
(disjoint), and a task's negatives are drawn evenly from the other classes: ⌈n_pos / (C − 1)⌉ from each,
then n_pos of those at random (a short class's share is made up from the others). A class with fewer
texts than asked gives all it has, split between train and test in the asked ratio; its tasks are then
smaller, and the actual sizes are recorded per task.

Indices refer to the caller's list of texts; every draw comes from the `random.Random` passed in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Task:
    """One balanced one-vs-rest task: text indices and their labels (1 = `target`)."""

    target: str
    train: list[int]
    y_train: list[int]
    test: list[int]
    y_test: list[int]


def split_per_class(
    pools: dict[str, list[int]], n_train: int, n_test: int, rng: random.Random
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Per class, disjoint (train, test) index lists of n_train // 2 and n_test // 2 items (a short class:
    all its items, test getting the asked share, rounded)."""
    want_tr, want_te = n_train // 2, n_test // 2
    train, test = {}, {}
    for c, pool in pools.items():
        items = rng.sample(pool, min(len(pool), want_tr + want_te))
        n_te = (
            want_te if len(items) == want_tr + want_te else round(len(items) * want_te / (want_tr + want_te))
        )
        test[c] = items[:n_te]
        train[c] = items[n_te : n_te + want_tr]
    return train, test


def draw_negatives(split: dict[str, list[int]], target: str, rng: random.Random) -> list[int]:
    """As many negatives as `target` has items, drawn evenly from the other classes: ⌈n_pos / (C − 1)⌉
    from each, then n_pos of those. Where a class has fewer, the other classes' remaining items make up the
    difference (SAEBench's classes are never short); fewer negatives only when all of them run out."""
    n_pos = len(split[target])
    others = [c for c in split if c != target]
    if not others or n_pos == 0:
        return []
    per_class = math.ceil(n_pos / len(others))
    pool, rest = [], []
    for c in others:
        items = rng.sample(split[c], len(split[c]))
        pool += items[:per_class]
        rest += items[per_class:]
    if len(pool) < n_pos:
        pool += rng.sample(rest, min(n_pos - len(pool), len(rest)))
    return rng.sample(pool, min(n_pos, len(pool)))


def task_targets(classes: Sequence[str]) -> list[str]:
    """Classes that get a task. With two classes the second class's task is the first one's with the labels
    flipped (same texts, same features, same accuracy), so it is run once."""
    return list(classes[:1]) if len(classes) == 2 else list(classes)


def make_task(
    train: dict[str, list[int]], test: dict[str, list[int]], target: str, rng: random.Random
) -> Task:
    """The target's texts as positives plus drawn negatives, for train and test separately."""
    sets = []
    for split in (train, test):
        pos, neg = list(split[target]), draw_negatives(split, target, rng)
        sets.append((pos + neg, [1] * len(pos) + [0] * len(neg)))
    (tr, y_tr), (te, y_te) = sets
    return Task(target, tr, y_tr, te, y_te)


def make_tasks(
    labels: Sequence[str | None], classes: Sequence[str], n_train: int, n_test: int, rng: random.Random
) -> list[Task]:
    """Every task of a dataset. `labels[i]` is text i's class (None: not usable, e.g. empty)."""
    pools: dict[str, list[int]] = {c: [] for c in classes}
    for i, label in enumerate(labels):
        if label in pools:
            pools[label].append(i)
    train, test = split_per_class(pools, n_train, n_test, rng)
    return [make_task(train, test, c, rng) for c in task_targets(classes)]
