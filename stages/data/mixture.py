"""Weighted mixtures of datasets: which record of which source comes next, seeded.

Usage::

    probabilities = mixture_probabilities([3, 1], temperature=1.0)       # [0.75, 0.25]
    order = sample_mixture([len(a), len(b)], probabilities, seed=0)    # [(0, 17), (1, 4), (0, 3), ...]
    records = [sources[s][i] for s, i in order]

The draw itself is ``datasets.interleave_datasets`` (probabilities, seed, stopping strategy) over one small
dataset of record positions per source: the library's sampler, while the records stay the loader's typed
records (sources of one kind may still differ in their TRL columns, e.g. a preference ``margin``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def mixture_probabilities(weights: Sequence[float], temperature: float = 1.0) -> list[float]:
    """Sampling probabilities ``p_i ∝ w_i ** (1 / T)``: the weights at T = 1, flatter (toward uniform) as T grows,
    sharper (toward the heaviest source) below 1."""
    if not weights or any(not w > 0 for w in weights):
        raise ValueError(f"mixture weights must be positive, got {list(weights)}")
    if not temperature > 0:
        raise ValueError(f"sampling_temperature must be positive, got {temperature}")
    scaled = [w ** (1.0 / temperature) for w in weights]
    total = sum(scaled)
    return [s / total for s in scaled]


def sample_mixture(sizes: Sequence[int], probabilities: Sequence[float], seed: int = 0,
                   stopping_strategy: str = "first_exhausted") -> list[tuple[int, int]]:
    """``(source, position)`` of every record of the mixture, in order.

    Each source's records are taken in a seeded random order (a file's order never decides which records
    a ``first_exhausted`` mixture leaves out); then each next record comes from source i with probability
    ``probabilities[i]`` until the first source runs out (``first_exhausted``: no record repeats) or until
    every source was used up once (``all_exhausted``: the others start over)."""
    from datasets import Dataset, interleave_datasets

    if len(sizes) != len(probabilities):
        raise ValueError(f"{len(sizes)} sources but {len(probabilities)} probabilities")
    if any(n < 1 for n in sizes):
        raise ValueError(f"every source of a mixture needs records, got sizes {list(sizes)}")
    parts = []
    for source, n in enumerate(sizes):
        positions = list(range(n))
        random.Random(f"mixture/{seed}/{source}").shuffle(positions)
        parts.append(Dataset.from_dict({"source": [source] * n, "position": positions}))
    if len(parts) == 1:
        return [(0, p) for p in parts[0]["position"]]
    mixed = interleave_datasets(parts, probabilities=list(probabilities), seed=seed,
                                stopping_strategy=stopping_strategy)
    return list(zip(mixed["source"], mixed["position"]))
