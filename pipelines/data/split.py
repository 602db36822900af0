"""Train/validation split by document identity: independent of input order, shard count and worker count."""
from __future__ import annotations

import hashlib


def validation_score(doc_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the document's identity and the seed."""
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_validation(doc_id: str, seed: int, fraction: float) -> bool:
    return validation_score(doc_id, seed) < fraction
