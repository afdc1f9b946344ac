"""Splitting a task's images across the devices of its fleet: IID or Dirichlet over labels.

Pure functions of ids, labels and a seed: the same arguments give the same split everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mist_fed.errors import ConfigError


def sample_pool(n_total: int, n_wanted: int, seed: int, stream: int = 0) -> list[int]:
    """The first ``n_wanted`` indices of a seeded permutation of ``range(n_total)``.

    A larger pool contains every smaller one with the same seed, so fleets that share a task
    ask the cloud for overlapping images rather than new ones. ``stream`` > 0 draws another
    permutation from the same seed (the later groups of a fleet that shares images).
    """
    if n_wanted > n_total:
        raise ConfigError(
            f"the fleet needs {n_wanted} images but the split has {n_total}; "
            "use fewer devices or fewer images per device"
        )
    key = [seed, 7919] if stream == 0 else [seed, 7919, stream]
    perm = np.random.default_rng(key).permutation(n_total)
    return perm[:n_wanted].tolist()


def share_images(
    labels: Sequence[int],
    parts: int,
    per_part: int,
    kind: str,
    seed: int,
    alpha: float = 0.5,
) -> list[list[int]]:
    """Each of ``parts`` devices' indices into ``labels`` (a split): ``per_part`` each (IID).

    When the split holds ``parts x per_part`` images, the shares are disjoint: a seeded pool
    of that size split by :func:`split_indices`. When it does not, devices share images: they
    are taken in groups of ``len(labels) // per_part`` devices, and each group splits its own
    seeded pool the same way (group 0 exactly as a fleet that fits), so shares are disjoint
    within a group, overlap across groups, and every device's images are distinct.
    """
    n_total = len(labels)
    if per_part > n_total:
        raise ConfigError(
            f"a device wants {per_part} images but the split has {n_total}; "
            "use fewer images per device"
        )
    group = max(1, n_total // per_part)
    out: list[list[int]] = []
    for g, start in enumerate(range(0, parts, group)):
        members = min(group, parts - start)
        pool = sample_pool(n_total, members * per_part, seed, stream=g)
        sub = split_indices([labels[i] for i in pool], members, kind, seed + 104_729 * g, alpha)
        out.extend([pool[i] for i in share] for share in sub)
    return out


def shared(parts: int, per_part: int, n_total: int) -> bool:
    """Whether ``parts`` devices of ``per_part`` images each must share a split of ``n_total``."""
    return parts * per_part > n_total


def iid_split(n: int, parts: int, seed: int) -> list[list[int]]:
    """``range(n)`` shuffled and cut into ``parts`` shares of near-equal size."""
    if parts < 1 or n < parts:
        raise ConfigError(f"cannot split {n} items into {parts} non-empty parts")
    perm = np.random.default_rng([seed, 1]).permutation(n)
    return [sorted(chunk.tolist()) for chunk in np.array_split(perm, parts)]


def dirichlet_split(
    labels: Sequence[int], parts: int, alpha: float, seed: int, min_size: int = 1
) -> list[list[int]]:
    """Label-skewed split: each class is spread over parts by proportions ~ Dir(alpha).

    Small ``alpha`` gives each device few classes. Redraws (up to 100 times) until every part
    has at least ``min_size`` items, then moves single items from the largest parts.
    """
    y = np.asarray(labels)
    if parts < 1 or len(y) < parts * min_size:
        raise ConfigError(f"cannot split {len(y)} items into {parts} parts of >= {min_size}")
    rng = np.random.default_rng([seed, 2])
    classes = np.unique(y)
    best: list[list[int]] = []
    for _ in range(100):
        shares: list[list[int]] = [[] for _ in range(parts)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            props = rng.dirichlet(np.full(parts, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for p, chunk in enumerate(np.split(idx, cuts)):
                shares[p].extend(chunk.tolist())
        best = shares
        if min(len(s) for s in shares) >= min_size:
            break
    while min(len(s) for s in best) < min_size:  # rebalance the rare leftovers
        big = max(range(parts), key=lambda p: len(best[p]))
        small = min(range(parts), key=lambda p: len(best[p]))
        best[small].append(best[big].pop())
    return [sorted(s) for s in best]


def split_indices(
    labels: Sequence[int], parts: int, kind: str, seed: int, alpha: float = 0.5
) -> list[list[int]]:
    if kind == "iid":
        return iid_split(len(labels), parts, seed)
    if kind == "dirichlet":
        return dirichlet_split(labels, parts, alpha, seed)
    raise ConfigError(f"unknown split {kind!r}; use iid or dirichlet")
