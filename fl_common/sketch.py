"""Keyed record sketches: how factories find shared records without revealing any.

A factory that trains on another's records (a copy, or a data set two firms both bought) would
double that data's weight in FedAvg and so its pay. Under factory DP the updates alone often
cannot show it. So each factory hashes the records it trains on under a key the factories share
and the operator does not have, keeps the 256 smallest keyed hashes (a bottom-k MinHash sketch)
and sends them with its reply; the server estimates from two sketches how much two record sets
overlap (:func:`fingerprint_similarity`) and scores and aggregates a group that overlaps as one
factory (:mod:`strategies.contribution.guards`).

What a sketch reveals: to the server, which lacks the key, nothing about any record (a keyed
hash is a pseudo-random number without the key) beyond the number of hashes, at most the
sketch size. Someone holding both the key and a sketch (a factory colluding with the operator)
can test whether a record it knows is among the sketch's smallest hashes: the sketch is outside
what epsilon counts, which is why a deployed factory sends one only when its node config gives
the key (``record-sketch-key``), its own decision. The sketch is a commitment, too: it is a
deterministic function of the records and the key, so an audit at the factory can recompute it
from the records it trained on; a factory that reports the sketch of other records escapes the
rule in the run, not the audit.

Pure functions (numpy, pandas, hashlib), used on both sides of the wire.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

#: Hashes a factory keeps of its records (the sketch size); the estimate's error is about
#: ``sqrt(J (1 - J) / size)`` for a Jaccard similarity ``J``.
DEFAULT_SKETCH_SIZE = 256
#: Decimals numbers are rounded to before hashing, so re-encoding a record does not change it.
DEFAULT_DECIMALS = 4
#: Size of the factories' shared key in bytes (keyed BLAKE2b takes 16 to 64).
KEY_BYTES = (16, 64)


def is_sketch_key(key: object) -> bool:
    """Whether ``key`` can key a sketch: a string of :data:`KEY_BYTES` bytes (UTF-8)."""
    return isinstance(key, str) and KEY_BYTES[0] <= len(key.encode()) <= KEY_BYTES[1]


def record_fingerprint(
    frame: pd.DataFrame, key: str, size: int = DEFAULT_SKETCH_SIZE, decimals: int = DEFAULT_DECIMALS
) -> np.ndarray:
    """A bottom-``size`` MinHash sketch of a factory's records, keyed by a federation secret.

    Each record (row; numbers rounded to ``decimals`` so re-encoding does not change it) is
    hashed, the hash is hashed again with keyed BLAKE2b (``key``: 16 to 64 bytes, shared by the
    factories), and the ``size`` smallest keyed hashes are kept. Two factories compare sketches
    (:func:`fingerprint_similarity`) to estimate how
    many records they share without revealing any: without the key a hash says nothing about
    its record, and a sketch holds ``size`` hashes however large the data. A factory computes
    it at home and reports it; records perturbed beyond the rounding escape it (and are then
    different, noisier data).
    """
    secret = key.encode()
    if not is_sketch_key(key):
        raise ValueError(f"fingerprint key must be 16 to 64 bytes, got {len(secret)}")
    if size < 1:
        raise ValueError(f"fingerprint size must be positive, got {size}")
    rows = pd.util.hash_pandas_object(frame.round(decimals), index=False).to_numpy(np.uint64)
    keyed = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8, key=secret).digest(), "big")
            for r in rows
        ),
        dtype=np.uint64,
        count=rows.size,
    )
    return np.unique(keyed)[:size]


def fingerprint_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two factories' record sets from bottom-k sketches.

    The standard bottom-k estimator: among the ``k`` smallest hashes of the union of both
    sketches (``k`` the smaller sketch size), the fraction present in both.
    """
    a, b = np.unique(np.asarray(a, np.uint64)), np.unique(np.asarray(b, np.uint64))
    k = min(a.size, b.size)
    if k == 0:
        return 0.0
    union = np.union1d(a, b)[:k]
    both = np.intersect1d(a, b)
    return float(np.isin(union, both).sum() / k)
