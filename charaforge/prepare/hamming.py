"""Near-duplicate search over packed binary hashes: every pair within a Hamming distance.

Brute force in blocks (`near_pairs`, numpy, the reference), multi-index hashing on faiss's
binary inverted file (`mih_pairs`) and a cost model that picks between them (`search_pairs`).
Every method returns the same pairs.

Multi-index hashing (Norouzi et al.): cut the hash into m blocks; two hashes within distance t
differ by at most about t / m bits on at least one block (pigeonhole). Each block is an
`IndexBinaryIVF` whose inverted lists are the block's key values (2^size lists, one per key, so
no quantizer is trained), and every hash is a query that probes the lists within the block's
radius of its own key, given to faiss ready-made (`range_search_preassigned`). faiss then
compares full codes inside the probed lists in C++ (contiguous codes, one popcount per 64 bits)
and keeps those within the threshold. Why not faiss's own `IndexBinaryMultiHash`: its fixed
16-bit tables and per-query candidate sets made it grow with the square of the count here
(2.1 s / 18.9 s / 142 s at 20k / 40k / 100k hashes).
"""

from __future__ import annotations

import itertools
import math

import faiss
import numpy as np

# Popcount of every byte value: Hamming distance = sum of POPCOUNT[a ^ b] over the packed bytes.
POPCOUNT = (
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint16)
)
# Popcount of every 16-bit value: four look-ups per 64-bit word (numpy<2 has no bitwise_count).
POPCOUNT16 = (POPCOUNT[np.arange(1 << 16) >> 8] + POPCOUNT[np.arange(1 << 16) & 0xFF]).astype(
    np.uint8
)
# Blocks of at most this many bits: one inverted list per key value, so 2^20 lists (~50 MB of
# empty lists) at most.
MAX_BLOCK_BITS = 20
# Cost-model units: one full code compared inside faiss (~1 ns). A probed list costs faiss a
# few virtual calls, an entry of a query's probe row a copy and a test; brute force costs about
# this much per pair and 64-bit word (numpy XOR and four table look-ups).
LIST_VISIT = 25.0
PROBE_ENTRY = 1.5
BRUTE_PAIR = 10.0
# Query rows of the probe table handed to faiss at once (bounds its memory: rows x probes).
PROBE_TABLE_ENTRIES = 1 << 23


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
    """Expected work of multi-index hashing with m blocks (uniform hashes), in codes compared."""
    cost = 0.0
    for _, size, radius in _blocks(bits, m, threshold):
        probes = _ball_size(size, radius)
        # Each pair of lists is probed from one side only (see `_probe_table`): half the ball
        # per query, each list holding n / 2^size codes; every query walks a whole table row.
        cost += n * probes / 2 * (LIST_VISIT + n / 2.0**size) + n * probes * PROBE_ENTRY
    return cost


def choose_blocks(n: int, bits: int, threshold: int) -> int:
    """The number of blocks m with the lowest expected cost (blocks of at most 20 bits)."""
    options = [m for m in range(1, bits + 1) if -(-bits // m) <= MAX_BLOCK_BITS]
    return min(options, key=lambda m: (mih_cost(n, bits, m, threshold), m))


def _block_keys(bit_matrix: np.ndarray, start: int, size: int) -> np.ndarray:
    keys = np.zeros(len(bit_matrix), dtype=np.int64)
    for bit in range(start, start + size):
        keys = (keys << 1) | bit_matrix[:, bit]
    return keys


def _probe_table(
    keys: np.ndarray, size: int, radius: int, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each distinct key u of the sorted `keys`: the non-empty lists v within `radius` of u
    with v >= u (so each pair of lists is searched once, from the smaller key; u's own list from
    both sides), the others -1, which faiss skips at no cost. Returns (rows, row of each key)."""
    starts = np.concatenate([[True], keys[1:] != keys[:-1]])  # the keys come sorted
    distinct, row_of = keys[starts], np.cumsum(starts) - 1
    masks = np.array(
        [0]
        + [
            sum(1 << b for b in flipped)
            for k in range(1, radius + 1)
            for flipped in itertools.combinations(range(size), k)
        ],
        dtype=np.int64,
    )
    lists = distinct[:, None] ^ masks[None, :]
    lists[(lists < distinct[:, None]) | (counts[lists] == 0)] = -1
    return lists, row_of


def mih_pairs(
    packed: np.ndarray, threshold: int, blocks: int | None = None, threads: int | None = None
) -> np.ndarray:
    """Multi-index hashing: exactly the pairs `near_pairs` finds, without comparing all pairs.

    `threads`: faiss's OpenMP threads for the search (None: faiss's current setting); the pairs
    do not depend on it.
    """
    n = len(packed)
    if n < 2:
        return np.zeros((0, 3), dtype=np.int64)
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    bits_total = packed.shape[1] * 8
    m = blocks or choose_blocks(n, bits_total, threshold)
    plan = _blocks(bits_total, m, threshold)
    if any(size > MAX_BLOCK_BITS for _, size, _ in plan):
        raise ValueError(f"{m} blocks of {bits_total} bits exceed {MAX_BLOCK_BITS} bits each")
    bit_matrix = np.unpackbits(packed, axis=1)
    found: list[np.ndarray] = [np.zeros((0, 3), dtype=np.int64)]
    previous_threads = faiss.omp_get_max_threads()
    if threads is not None:
        faiss.omp_set_num_threads(max(1, threads))
    try:
        for start, size, radius in plan:
            found.extend(
                _search_block(packed, _block_keys(bit_matrix, start, size), size, radius, threshold)
            )
    finally:
        faiss.omp_set_num_threads(previous_threads)
    pairs = np.concatenate(found)
    # A pair close on several blocks is found on each, and inside a list from both sides.
    _, first = np.unique(pairs[:, 0] * n + pairs[:, 1], return_index=True)
    return pairs[first]


def _search_block(
    packed: np.ndarray, keys: np.ndarray, size: int, radius: int, threshold: int
) -> list[np.ndarray]:
    """Verified pairs (i < j) among hashes whose block keys differ by at most `radius` bits."""
    n, width = packed.shape
    # Queries and lists in key order: consecutive queries probe the same lists (cache-warm).
    order = np.argsort(keys, kind="stable")
    sorted_keys = np.ascontiguousarray(keys[order])
    sorted_codes = np.ascontiguousarray(packed[order])
    ids = order.astype(np.int64)
    lists = 1 << size
    index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(width * 8), width * 8, lists)
    index.is_trained = True  # the lists are the key values: nothing to train
    index.add_core(
        n, faiss.swig_ptr(sorted_codes), faiss.swig_ptr(ids), faiss.swig_ptr(sorted_keys)
    )
    counts = np.bincount(sorted_keys, minlength=lists)
    table, row_of = _probe_table(sorted_keys, size, radius, counts)
    index.nprobe = table.shape[1]
    found = []
    step = max(1, PROBE_TABLE_ENTRIES // table.shape[1])
    for begin in range(0, n, step):
        chunk = slice(begin, begin + step)
        # faiss's range search keeps distances strictly below the radius it is given.
        limits, distances, labels = index.range_search_preassigned(
            sorted_codes[chunk], threshold + 1, table[row_of[chunk]], None
        )
        queries = np.repeat(ids[chunk], np.diff(limits.astype(np.int64)))
        other = labels != queries
        queries, labels, distances = queries[other], labels[other], distances[other]
        found.append(
            np.stack(
                [np.minimum(queries, labels), np.maximum(queries, labels), distances], axis=1
            ).astype(np.int64)
        )
    return found


def search_pairs(
    packed: np.ndarray, threshold: int, method: str = "auto", threads: int | None = None
) -> np.ndarray:
    """Pairs within `threshold` by `method` (auto: the cheaper of MIH and brute force)."""
    n = len(packed)
    if method == "auto":
        bits = packed.shape[1] * 8 if n else 0
        brute = n * n / 2 * max(1, -(-bits // 64)) * BRUTE_PAIR
        mih = mih_cost(n, bits, choose_blocks(n, bits, threshold), threshold) if n > 1 else 0
        method = "mih" if mih < brute else "brute"
    if method == "mih":
        return mih_pairs(packed, threshold, threads=threads)
    return near_pairs(packed, threshold)
