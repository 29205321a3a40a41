"""Seeds derived from (seed, step, rank, ...): every random draw of a run is reproducible from its config."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, e.g. `derive_seed(seed, step, rank)`."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
               .astype(np.uint64).dot([1 << 31, 1]))


def torch_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on `device` seeded by `derive_seed(*keys)`."""
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


def numpy_generator(*keys: int) -> np.random.Generator:
    """A numpy generator seeded by `derive_seed(*keys)`."""
    return np.random.default_rng(derive_seed(*keys))
