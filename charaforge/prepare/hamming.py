"""Near-duplicate search over packed binary hashes: every pair within a Hamming distance.

Brute force in blocks (`near_pairs`), multi-index hashing (`mih_pairs`: split the bits into m
blocks; two hashes within distance t agree within distance t // m on at least one block, so only
those candidates are compared) and a cost model that picks between them (`search_pairs`). Every
method returns the same pairs.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

# Popcount of every byte value: Hamming distance = sum of POPCOUNT[a ^ b] over the packed bytes.
POPCOUNT = (
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint16)
)
# Popcount of every 16-bit value: four look-ups per 64-bit word (numpy<2 has no bitwise_count).
POPCOUNT16 = (POPCOUNT[np.arange(1 << 16) >> 8] + POPCOUNT[np.arange(1 << 16) & 0xFF]).astype(
    np.uint8
)
# Cost-model units (one element operation of a vectorised pass): the fixed cost of one probe,
# and of one pair compared by brute force per 64-bit word.
PROBE_OVERHEAD = 5000.0
BRUTE_PAIR = 2.0


def as_words(packed: np.ndarray) -> np.ndarray:
    """Packed hash bytes as big-endian uint64 words (n x ceil(bytes / 8)), zero-padded."""
    n, width = packed.shape
    words = -(-width // 8)
    padded = np.zeros((n, words * 8), dtype=np.uint8)
    padded[:, :width] = packed
    return padded.view(">u8").astype(np.uint64)


def popcount64(values: np.ndarray) -> np.ndarray:
    """Bits set in each uint64 (as int64)."""
    mask = np.uint64(0xFFFF)
    total = POPCOUNT16[values & mask].astype(np.int64)
    for shift in (16, 32, 48):
        total += POPCOUNT16[(values >> np.uint64(shift)) & mask]
    return total


def _distances(words: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    total = popcount64(words[i, 0] ^ words[j, 0])
    for column in range(1, words.shape[1]):
        total += popcount64(words[i, column] ^ words[j, column])
    return total


def near_pairs(packed: np.ndarray, threshold: int, block: int = 1024) -> np.ndarray:
    """All-pairs brute force: pairs (i < j) within `threshold`, as an (m, 3) int64 array of
    i, j, distance, sorted. Vectorised XOR + popcount over a block of rows against all rows, so
    memory stays at block x n words instead of n x n.
    """
    words = as_words(packed) if packed.size else np.zeros((len(packed), 1), np.uint64)
    found: list[np.ndarray] = [np.zeros((0, 3), dtype=np.int64)]
    n = len(words)
    for start in range(0, n, block):
        rows = words[start : start + block]
        # Only columns j > i are needed: the block is compared with itself and what follows.
        rest = words[start:]
        distances = popcount64(rows[:, None, 0] ^ rest[None, :, 0])
        for column in range(1, words.shape[1]):
            distances += popcount64(rows[:, None, column] ^ rest[None, :, column])
        i, j = np.nonzero(distances <= threshold)
        upper = i < j
        i, j = i[upper], j[upper]
        found.append(np.stack([i + start, j + start, distances[i, j]], axis=1).astype(np.int64))
    return np.concatenate(found)


def _ball_size(bits: int, radius: int) -> int:
    return sum(math.comb(bits, k) for k in range(radius + 1))


def _blocks(bits: int, m: int, threshold: int) -> list[tuple[int, int, int]]:
    """(start bit, length, search radius) of each block; blocks with radius < 0 are left out.

    Pigeonhole, sharpened: with r = m * q + a, two hashes within r differ by at most q bits on
    one of the first a + 1 blocks or by at most q - 1 on one of the others.
    """
    q, a = divmod(threshold, m)
    sizes = [bits // m + (1 if k < bits % m else 0) for k in range(m)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    blocks = [
        (start, size, q if k <= a else q - 1)
        for k, (start, size) in enumerate(zip(starts, sizes, strict=True))
    ]
    return [block for block in blocks if block[2] >= 0]


def mih_cost(n: int, bits: int, m: int, threshold: int) -> float:
    """Expected work of multi-index hashing with m blocks (uniform hashes): probes + candidates."""
    cost = 0.0
    for _, size, radius in _blocks(bits, m, threshold):
        probes = _ball_size(size, radius)
        # Per probe: a fixed overhead (a dozen numpy calls, worth ~5000 element operations),
        # one pass over the keys, and the candidates found in the probed buckets.
        cost += probes * (PROBE_OVERHEAD + n * (1.0 + 1.5 * n / 2.0**size))
    return cost


def choose_blocks(n: int, bits: int, threshold: int) -> int:
    """The number of blocks m with the lowest expected cost (blocks of at most 32 bits)."""
    options = [m for m in range(1, bits + 1) if bits / m <= 32]
    return min(options, key=lambda m: (mih_cost(n, bits, m, threshold), m))


def mih_pairs(packed: np.ndarray, threshold: int, blocks: int | None = None) -> np.ndarray:
    """Multi-index hashing: exactly the pairs `near_pairs` finds, without comparing all pairs."""
    n = len(packed)
    if n < 2:
        return np.zeros((0, 3), dtype=np.int64)
    bits_total = packed.shape[1] * 8
    words = as_words(packed)
    bit_matrix = np.unpackbits(packed, axis=1)
    m = blocks or choose_blocks(n, bits_total, threshold)
    found: list[np.ndarray] = [np.zeros((0, 3), dtype=np.int64)]
    for start, size, radius in _blocks(bits_total, m, threshold):
        keys = np.zeros(n, dtype=np.int64)
        for bit in range(start, start + size):
            keys = (keys << 1) | bit_matrix[:, bit]
        found.extend(_block_pairs(keys, size, radius, words, threshold))
    pairs = np.concatenate(found)
    # A pair close on several blocks (or probes) is found several times: keep one of each.
    _, first = np.unique(pairs[:, 0] * n + pairs[:, 1], return_index=True)
    return pairs[first]


def _block_pairs(
    keys: np.ndarray, size: int, radius: int, words: np.ndarray, threshold: int
) -> list[np.ndarray]:
    """Verified pairs among hashes whose block keys differ by at most `radius` bits.

    Works in sorted-key order: a bucket is then a contiguous run, and for every probe mask the
    keys u ^ mask of sorted keys u are piecewise sorted too, so the table look-ups and the hash
    comparisons walk memory almost sequentially (about twice as fast as in input order).
    """
    n = len(keys)
    index_type = np.int32 if n < 2**31 else np.int64
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order].astype(np.int32 if size <= 31 else np.int64)
    sorted_words = words[order]
    dense = size <= 22
    if dense:  # a direct table: bucket start and size by key
        counts = np.bincount(sorted_keys, minlength=1 << size).astype(index_type)
        starts = (np.cumsum(counts, dtype=np.int64) - counts).astype(index_type)

    def lookup(query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if dense:
            return starts[query], counts[query]
        left = np.searchsorted(sorted_keys, query, side="left")
        return left, np.searchsorted(sorted_keys, query, side="right") - left

    found = []
    masks = [0] + [
        sum(1 << b for b in flipped)
        for k in range(1, radius + 1)
        for flipped in itertools.combinations(range(size), k)
    ]
    positions = np.arange(n, dtype=index_type)
    for mask in masks:
        if mask == 0:
            # Pairs inside a bucket: each sorted position with the positions after it.
            source = positions
            bucket_start, bucket_count = lookup(sorted_keys)
            first = positions + 1
            count = bucket_start + bucket_count - first
        else:
            query = sorted_keys ^ sorted_keys.dtype.type(mask)
            # Each unordered pair of buckets (u, u ^ mask) once: from its smaller key.
            source = np.flatnonzero(sorted_keys < query).astype(index_type)
            first, count = lookup(query[source])
        hit = count > 0
        source, first, count = source[hit], first[hit], count[hit]
        if not len(source):
            continue
        total = int(count.sum())
        i = np.repeat(source, count)
        offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
        j = np.repeat(first, count) + offsets
        distance = _distances(sorted_words, i, j)
        close = distance <= threshold
        i, j, distance = order[i[close]], order[j[close]], distance[close]
        found.append(np.stack([np.minimum(i, j), np.maximum(i, j), distance], axis=1))
    return found


def search_pairs(packed: np.ndarray, threshold: int, method: str = "auto") -> np.ndarray:
    """Pairs within `threshold` by `method` (auto: the cheaper of MIH and brute force)."""
    n = len(packed)
    if method == "auto":
        bits = packed.shape[1] * 8 if n else 0
        brute = n * n / 2 * max(1, bits // 64) * BRUTE_PAIR
        mih = mih_cost(n, bits, choose_blocks(n, bits, threshold), threshold) if n > 1 else 0
        method = "mih" if mih < brute else "brute"
    return mih_pairs(packed, threshold) if method == "mih" else near_pairs(packed, threshold)
