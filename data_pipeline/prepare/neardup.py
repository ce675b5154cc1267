"""Near-duplicate removal: MinHash LSH over character shingles of each example's user and assistant turns.

Signatures are made in the Ray step (screen.Screen, in parallel): datasketch's MinHash over the example's
character k-grams, cut into b bands of r values (datasketch's MinHashLSH chooses b and r for the Jaccard
threshold and num_perm), each band hashed to one int64 that also encodes the band's index. The decision is made on
the driver (NearDupIndex), in (file, line) order: an example whose band hash equals one of a kept example's in
the same band is a near-duplicate of it and rejected; otherwise it is kept and its bands indexed. Only kept
examples are indexed, so the example named in a reject is always one in the shards, and the result is the same
as a single-process run whatever the parallelism.

What is shingled: the user and assistant turns, not the system prompt (shared by every example, it would only
raise every pair's similarity), after NFKC, case-folding and dropping whitespace and punctuation (a copy with
its commas changed is the same text). The whole conversation, not the answer alone: the exact-duplicate pass
compares whole conversations, and this pass extends it to near-copies; a template answer reused for a genuinely
different question, or another answer to the same question, is a distinct example and stays.
"""

from __future__ import annotations

import functools
import unicodedata
from array import array

import numpy as np

from cbt_llm.domain.crisis import corpus_is_crisis, has_crisis_support
from data_pipeline.prepare.dedup import FirstSeen
from data_pipeline.sources.formats import hash64

SEED = 1  # MinHash permutation seed: fixed, so signatures (and so the decisions) never change between runs
# the index's recent-entry buffer: larger than FirstSeen's default, since each kept example adds `bands` entries
_INDEX_CHUNK = 1 << 17
_SKETCH_CHUNK = 1 << 16  # kept examples per block of sketches (blocks, so growth never copies them all)
_POLY = np.uint64(0x100000001B3)  # shingle_hashes: FNV's 64-bit prime as the polynomial's base
_MIX = np.uint64(0x9E3779B97F4A7C15)  # and a golden-ratio multiplier to spread the bits before the top 32 are kept


@functools.lru_cache(maxsize=8)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for this threshold and num_perm (its weighting
    of false positives against false negatives, 0.5 each)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int) -> np.ndarray:
    """MinHash's permutation parameters, made once per worker process rather than once per example."""
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=SEED).permutations


@functools.lru_cache(maxsize=1)
def _dropped() -> np.ndarray:
    """A table over all code points: True for what normalise drops, whitespace and punctuation (P*)."""
    table = np.zeros(0x110000, bool)
    for c in range(0x110000):
        table[c] = chr(c).isspace() or unicodedata.category(chr(c)).startswith("P")
    return table


def _kept(text: str) -> np.ndarray:
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    return cp[~_dropped()[cp]]


def _codepoints(text: str) -> np.ndarray:
    """normalise(text) as uint32 code points. Punctuation goes first, through a lookup table, so that most texts
    are NFKC already and skip it (np.isin, str.translate or a regex class of the ~850 punctuation code points
    each cost as much as the rest of the signature; NFKC a sixth of it); then NFKC, case-folding, and the
    table again for what NFKC made punctuation or space."""
    text = _kept(text).tobytes().decode("utf-32-le", "surrogatepass")
    if not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    return _kept(text.casefold())


def normalise(text: str) -> str:
    """NFKC, case-folded, without whitespace and punctuation: what shingles are cut from."""
    return _codepoints(text).tobytes().decode("utf-32-le", "surrogatepass")


def shingles(text: str, k: int) -> set[str]:
    """The distinct character k-grams of normalise(text) (the whole text when shorter than k): for exact
    Jaccard similarities (tests, bench); signatures hash the same k-grams with shingle_hashes."""
    t = normalise(text)
    if len(t) <= k:
        return {t}
    return {t[i : i + k] for i in range(len(t) - k + 1)}


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """A 32-bit hash of each distinct k-gram of normalise(text), computed in NumPy (a polynomial over the k code
    points, mixed, top 32 bits): datasketch's default SHA-1 per shingle in Python would be half the signature's cost.
    Two k-grams share a hash with odds ~n^2 / 2^33 per text, which MinHash does not notice."""
    cp = _codepoints(text).astype(np.uint64)
    k = max(1, min(k, len(cp)))
    n = len(cp) - k + 1
    h = np.zeros(n, np.uint64)
    for j in range(k):
        h = h * _POLY + cp[j : j + n]
    h ^= h >> np.uint64(29)
    h *= _MIX
    return np.unique((h >> np.uint64(32)).astype(np.uint32))


def conversation_text(messages: list[dict[str, str]]) -> str:
    """The text a conversation is compared on: its user and assistant turns, one per line."""
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


def signature(text: str, k: int, num_perm: int) -> np.ndarray:
    """The MinHash signature (num_perm uint32 values) of text's k-gram shingles: datasketch's MinHash over
    shingle_hashes (as its hashfunc sees them: the values are hashes already)."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=SEED, permutations=_permutations(num_perm), scheme="affine32", hashfunc=int)
    m.update_batch(shingle_hashes(text, k).tolist())
    return m.hashvalues


def sketch(sig: np.ndarray) -> bytes:
    """The low 8 bits of each signature value (b-bit minwise hashing): what the driver keeps per kept example
    to check a candidate pair, num_perm bytes instead of 4 x num_perm."""
    return (sig & 0xFF).astype(np.uint8).tobytes()


def estimate_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity estimated from two sketches: equal low bytes happen for equal minima (probability J)
    and by chance (1/256 of the rest), so J = (match - 1/256) / (1 - 1/256)."""
    match = float(np.count_nonzero(a == b)) / len(a)
    return (match - 1 / 256) / (1 - 1 / 256)


def crisis_group(messages: list[dict[str, str]]) -> int:
    """0-3: whether the user turns raise a crisis (the corpus's rule) and whether the assistant turns offer
    crisis support. Examples are only compared within a group, so a near-copy that adds a hotline to an answer,
    or asks the same thing with a crisis in it, is never dropped in favour of one without: deduplication must
    not thin the crisis examples the model learns the protocol from."""
    user = [m["content"] for m in messages if m["role"] == "user"]
    answer = "\n".join(m["content"] for m in messages if m["role"] == "assistant")
    return (corpus_is_crisis(*user) << 1) | has_crisis_support(answer)


def band_hashes(sig: np.ndarray, bands: int, rows: int, group: int = 0) -> list[int]:
    """One signed 64-bit hash per band of r signature values; the band's index and the example's crisis_group
    are hashed in, so equal values in two different bands, or in two groups, never match."""
    out = []
    for j in range(bands):
        blob = j.to_bytes(2, "little") + bytes([group]) + sig[j * rows : (j + 1) * rows].astype("<u4").tobytes()
        out.append(hash64(blob))
    return out


class NearDupIndex:
    """The band hashes of the kept examples -> which kept example they belong to (its ordinal), and per kept
    example its sketch (to check a candidate pair), its id and where it came from (for the reject's detail).

    The bands live in dedup.FirstSeen's sorted NumPy arrays, 16 bytes per band per kept example (b=9 at the
    default threshold 0.8 and num_perm 128: 144 bytes), the sketches in blocks of uint8 rows (num_perm bytes),
    the ids as UTF-8 in one bytearray with int64 offsets: ~300 bytes per kept example, ~300 MB at 1M.
    datasketch's own MinHashLSH keeps a Python dict per band (bytes keys -> sets of keys): bench/neardup_bench.py
    measured it at 11x our bands and ids (bench/RESULTS.md), too heavy for a driver that must stay flat-ish.

    Per batch: begin_batch (one vectorised look-up of the batch's bands in the merged arrays), then
    first_match / add per row in (file, line) order, then end_batch.
    """

    def __init__(self, threshold: float = 0.8):
        self.threshold = threshold
        self.seen = FirstSeen(chunk=_INDEX_CHUNK)
        self.sketches: list[np.ndarray] = []  # chunks of _SKETCH_CHUNK kept examples' sketches
        self._sketch_rows: list[np.ndarray] = []
        self.ids = bytearray()
        self.id_ends = array("q")
        self.wheres = array("q")
        self._flat: list[int] = []
        self._merged = np.zeros(0, np.int64)
        self._offs = np.zeros(1, np.int64)

    def __len__(self) -> int:
        """Kept examples indexed."""
        return len(self.wheres)

    def begin_batch(self, bands, sketches) -> None:
        """`bands`: the batch's list<int64> column (a row's band hashes; empty for rows that are not examples);
        `sketches`: its binary column of sketch() bytes."""
        self._sketch_rows = [np.frombuffer(b, np.uint8) for b in sketches.to_pylist()]
        col = bands.combine_chunks() if hasattr(bands, "combine_chunks") else bands
        flat = col.values.to_numpy()
        self._flat = flat.tolist()
        self._offs = col.offsets.to_numpy()
        self._merged = self.seen.lookup_merged(flat)

    def _hits(self, row: int) -> list[int]:
        s, e = self._offs[row], self._offs[row + 1]
        return [k for h, m in zip(self._flat[s:e], self._merged[s:e]) if (k := self.seen.get(h, int(m))) is not None]

    def first_match(self, row: int) -> tuple[str, int] | None:
        """(id, where) of the earliest kept example that shares a band with this row and whose sketch estimates
        a Jaccard similarity at or over the threshold, or None. Sharing a band alone is not enough: on the
        template corpus, whose answers share phrase banks, it paired examples at J 0.6-0.75 (precision 0.53)."""
        mine = self._sketch_rows[row]
        for k in sorted(set(self._hits(row))):
            if estimate_jaccard(mine, self._sketch(k)) >= self.threshold:
                start = self.id_ends[k - 1] if k else 0
                return self.ids[start : self.id_ends[k]].decode(), self.wheres[k]
        return None

    def _sketch(self, k: int) -> np.ndarray:
        return self.sketches[k // _SKETCH_CHUNK][k % _SKETCH_CHUNK]

    def add(self, row: int, example_id: str, where: int) -> None:
        """Index a kept row's bands (none of them is in the index: first_match found no match)."""
        k = len(self.wheres)
        # a band already held by a kept example (one that failed the check) keeps pointing at that first one
        s, e = self._offs[row], self._offs[row + 1]
        for h, m in zip(self._flat[s:e], self._merged[s:e]):
            if self.seen.get(h, int(m)) is None:
                self.seen.add(h, k)
        if k % _SKETCH_CHUNK == 0:
            self.sketches.append(np.zeros((_SKETCH_CHUNK, len(self._sketch_rows[row])), np.uint8))
        self.sketches[-1][k % _SKETCH_CHUNK] = self._sketch_rows[row]
        self.ids += example_id.encode()
        self.id_ends.append(len(self.ids))
        self.wheres.append(where)

    def end_batch(self) -> None:
        self.seen.merge_if_full()
