"""Seeds derived from the run seed: pure functions of (seed, index, purpose), never of the
process layout, so every stage count and replica layout draws the same random numbers
(docs/architecture.md, "The one invariant"). A leaf module."""
from __future__ import annotations

import hashlib

__all__ = ["derive_seed", "augment_seed"]


def derive_seed(seed: int, index: int, purpose: str) -> int:
    """A 63-bit seed for (run seed, block index, purpose), independent of process layout."""
    digest = hashlib.sha256(f"localloss-pp:{seed}:{index}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def augment_seed(seed: int, epoch: int, replica: int, seq: int) -> int:
    """Seed of the augmentation of batch `seq` of `epoch` on `replica` (a pure function)."""
    return derive_seed(seed, epoch, f"augment/replica{replica}/batch{seq}")
