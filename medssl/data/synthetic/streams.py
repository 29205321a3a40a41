"""Random streams of the synthetic cohorts: every draw comes from
`np.random.SeedSequence(seed, spawn_key=(stream, patient, ...))`, so patient k is the same whatever the
number of patients requested."""

from __future__ import annotations

import numpy as np

ANATOMY, LESIONS, HEART, STUDY, TRIAL, CONDITION, SPLIT = range(7)


def stream_rng(seed: int, *key: int) -> np.random.Generator:
    """A generator for (seed, stream, patient, ...)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))
