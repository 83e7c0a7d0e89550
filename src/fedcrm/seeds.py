"""Independent random streams: one per purpose (and per branch) of a simulation, from one seed.

Every random draw of a simulated experiment takes its own child of the run's
``numpy.random.SeedSequence`` (the children ``SeedSequence.spawn`` would make, addressed by
purpose so that adding a draw never shifts another), so that no two draws share a stream:
``default_rng([7, 0])`` and ``default_rng(7)`` are the same generator, which once made branch
0's simulated consent refusals the first rows of its test set. Two draws keep the root stream
on purpose: a branch's train/validation/test split (`fedcrm.data.split`), which a deployed
branch must be able to repeat from the run's seed alone, and the fixed sampled negatives of an
evaluation protocol (`fedcrm.data.movielens`, keyed per user).
"""

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """What a stream is for (its first spawn key)."""

    PARTITION = 1
    """Cutting the pooled data into branches (IID shuffle, Dirichlet proportions)."""
    CONSENT = 2
    """A simulated branch's consent decisions (key: its partition id)."""
    SYNTHETIC = 3
    """Synthetic data: a churn table, or interactions and their branch assignment."""


def sequence(seed: int, stream: Stream, *keys: int) -> np.random.SeedSequence:
    """The child of ``SeedSequence(seed)`` for ``stream`` (and ``keys``, e.g. a branch)."""
    return np.random.SeedSequence(seed, spawn_key=(int(stream), *keys))


def generator(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    """A NumPy generator on its own stream."""
    return np.random.default_rng(sequence(seed, stream, *keys))


def integer(seed: int, stream: Stream, *keys: int) -> int:
    """A 32-bit seed from the stream, for libraries that take an integer seed."""
    return int(sequence(seed, stream, *keys).generate_state(1)[0])
