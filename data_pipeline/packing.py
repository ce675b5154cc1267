"""Pack tokenized examples into fixed-capacity rows: pure Python + NumPy, deterministic.

An example is a pair (input_ids, labels) of equal-length int arrays. A packed row is the concatenation of
whole examples (never split across rows), with position_ids restarting at 0 at every example start, so a
model given position_ids (flash-attention varlen, or SDPA with a block-diagonal mask derived from them)
treats each example as its own sequence.

Two packers, and `pack_best`, which `cbt-llm prepare` uses by default:

- `pack_bfd`, best-fit-decreasing: longest first, each into the open row with the least room that still
  fits it. Near-optimal when lengths are spread out (long-tailed answers), but on narrow distributions it
  fills each row with a few large examples and leaves a gap smaller than any example left: on the synthetic
  corpus (148-246 tokens, mean 179) at seq_len 1024 it reaches 0.921, pack_best 0.947 (no packer can pass 0.949).
- `pack_target`, row at a time: the next item is the available length nearest to room / k, k being how many
  items of the remaining mean length the room still holds, so every row aims at a whole number of items
  that sum to the capacity; once the room is at most twice the largest length that fits, the row is finished
  with the pair (or single) of largest sum that fits. A row starts with the largest item left when that
  item is over 1.5x the per-item target, so long items are placed while fillers remain. Two ways to choose
  among pairs of equal sum: "balanced" (closest lengths: keeps the extremes of a peaked distribution to mix
  later) and "extreme" (largest item first: uses up the tails of a flat one).
- `pack_best` runs the three (target/balanced, target/extreme, BFD) on a window and keeps the one with the
  fewest rows. No one of them is best on every distribution (bench/packing_bench.py), the three cost about
  0.1 s per 20k-example window together, and the result is never worse than BFD's.

Numbers are in bench/RESULTS.md ("Packing").
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from data_pipeline.shards import IGNORE


def pack_bfd(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing.

    Returns bins as lists of indices into `lengths`. Deterministic: items are taken longest first, ties by
    index; a tie between rows with equal room goes to the row opened first. Inside a bin the indices are in
    the order they were placed (longest first). Raises ValueError if an item is longer than `capacity` or
    not positive.
    """
    if capacity <= 0:
        raise ValueError(f"capacity must be positive (got {capacity})")
    lengths = [int(x) for x in lengths]
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if lengths[order[0]] > capacity:
        raise ValueError(f"item {order[0]} has length {lengths[order[0]]} > capacity {capacity}")
    if lengths[order[-1]] <= 0:
        raise ValueError(f"item {order[-1]} has length {lengths[order[-1]]}; lengths must be positive")
    smallest = lengths[order[-1]]
    bins: list[list[int]] = []
    # (room left, bin id), kept sorted: bisect finds the tightest row that fits in O(log n).
    # Rows with less room than the smallest item can never take another one, so they leave the list.
    room: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        pos = bisect.bisect_left(room, (n, -1))
        if pos < len(room):
            left, b = room.pop(pos)
            bins[b].append(i)
            left -= n
        else:
            b = len(bins)
            bins.append([i])
            left = capacity - n
        if left >= smallest:
            bisect.insort(room, (left, b))
    return bins


def _check_lengths(lengths: Sequence[int], capacity: int) -> list[int]:
    if capacity <= 0:
        raise ValueError(f"capacity must be positive (got {capacity})")
    lengths = [int(x) for x in lengths]
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"item {i} has length {n} > capacity {capacity}")
        if n <= 0:
            raise ValueError(f"item {i} has length {n}; lengths must be positive")
    return lengths


def pack_target(lengths: Sequence[int], capacity: int, pairs: str = "balanced") -> list[list[int]]:
    """Fill one row at a time towards a whole number of items of the remaining mean length.

    Returns bins as lists of indices into `lengths`, in the order they were placed. Per row: start with the
    largest item left if it is over 1.5x capacity / k0 (k0 = capacity / mean remaining length, rounded);
    then, while the room is more than twice the largest length that fits, take the available length nearest
    to room / k (k = room / mean remaining length, rounded, at least 1); then take the pair (or single) of
    largest sum that fits, `pairs` deciding between equal sums: "balanced" takes the two closest lengths,
    "extreme" the largest first; repeat while anything fits. Items of one length are taken in index order
    and every comparison is on integers, so the result is a function of the lengths alone. Cost: a bisect
    per item, plus at most a scan of the distinct lengths (a bisect each) per row to find the pair. Raises
    ValueError like pack_bfd.
    """
    if pairs not in ("balanced", "extreme"):
        raise ValueError(f"pairs must be 'balanced' or 'extreme' (got {pairs!r})")
    lengths = _check_lengths(lengths, capacity)
    buckets: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        buckets.setdefault(n, []).append(i)
    head = dict.fromkeys(buckets, 0)  # next unused index in each bucket
    count = {n: len(b) for n, b in buckets.items()}
    avail = sorted(buckets)  # distinct lengths with count > 0
    total, left = sum(lengths), len(lengths)

    def take(n: int) -> int:
        nonlocal total, left
        i = buckets[n][head[n]]
        head[n] += 1
        count[n] -= 1
        if count[n] == 0:
            del avail[bisect.bisect_left(avail, n)]
        total -= n
        left -= 1
        return i

    def items_that_fit(room: int) -> int:
        # round(room / (total / left)), half up, at least 1
        return max(1, (2 * room * left + total) // (2 * total))

    def best_pair(room: int) -> tuple[int, int]:
        """Largest a + b <= room over available lengths (a >= b; a == b needs two of them); (0, 0) if none."""
        hi = bisect.bisect_right(avail, room - avail[0]) - 1  # largest a that leaves room for some b
        lo = max(bisect.bisect_left(avail, (room + 1) // 2) - 1, 0)  # from just under room / 2
        best, pair = 0, (0, 0)
        js = range(lo, hi + 1) if pairs == "balanced" else range(hi, lo - 1, -1)
        for j in js:
            a = avail[j]
            if pairs == "extreme" and 2 * a <= best:
                break  # a only falls from here: a + b <= 2a cannot beat best
            k = bisect.bisect_right(avail, min(room - a, a)) - 1
            if k >= 0 and avail[k] == a and count[a] < 2:
                k -= 1
            if k >= 0 and a + avail[k] > best:
                best, pair = a + avail[k], (a, avail[k])
                if best == room:
                    break
        return pair

    bins: list[list[int]] = []
    while left:
        row: list[int] = []
        room = capacity
        big = avail[-1]
        if 2 * big * items_that_fit(capacity) > 3 * capacity:  # big > 1.5 * capacity / k0
            row.append(take(big))
            room -= big
        while avail and room >= avail[0]:
            top = avail[bisect.bisect_right(avail, room) - 1]  # largest length that fits
            if room <= 2 * top:
                a, b = best_pair(room) if top < room else (0, 0)
                for n in (a, b) if a + b > top else (top,):
                    row.append(take(n))
                    room -= n
                continue
            k = items_that_fit(room)
            p = bisect.bisect_left(avail, -(-room // k))  # first length >= room / k
            # nearest to room / k: compare |n * k - room|; a tie goes to the shorter length
            cands = [avail[q] for q in (p - 1, p) if 0 <= q < len(avail) and avail[q] <= room]
            n = min(cands, key=lambda x: (abs(x * k - room), x))
            row.append(take(n))
            room -= n
        bins.append(row)
    return bins


PACKERS = ("best", "bfd")


def pack_best(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """The fewest rows of pack_target (balanced pairs), pack_target (extreme pairs) and pack_bfd, in that
    order of preference on a tie. Never more rows than pack_bfd."""
    lengths = _check_lengths(lengths, capacity)
    candidates = (
        pack_target(lengths, capacity, "balanced"),
        pack_target(lengths, capacity, "extreme"),
        pack_bfd(lengths, capacity),
    )
    return min(candidates, key=len)  # min keeps the first of equal ones


def pack(lengths: Sequence[int], capacity: int, packer: str = "best") -> list[list[int]]:
    """Dispatch on `data.packer`: "best" (pack_best) or "bfd" (pack_bfd)."""
    if packer == "best":
        return pack_best(lengths, capacity)
    if packer == "bfd":
        return pack_bfd(lengths, capacity)
    raise ValueError(f"unknown packer {packer!r} (one of {', '.join(PACKERS)})")


@dataclass
class Rows:
    """Packed rows in flat form: values of every row concatenated, `offsets[k]:offsets[k+1]` is row k."""

    input_ids: np.ndarray  # int32, flat
    labels: np.ndarray  # int32, flat
    position_ids: np.ndarray  # int32, flat
    offsets: np.ndarray  # int64, len rows + 1
    num_examples: np.ndarray  # int32, per row
    example_ids: list[list[str]]
    pad_tokens: int = 0

    @property
    def num_rows(self) -> int:
        return len(self.num_examples)

    @property
    def real_tokens(self) -> int:
        """Tokens that belong to an example (padding excluded)."""
        return int(self.input_ids.size - self.pad_tokens)

    @property
    def label_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def build_packed_rows(
    input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray], example_ids: Sequence[str], bins: list[list[int]]
) -> Rows:
    """Concatenate each bin's examples into one row; position_ids restart at 0 at each example."""
    order = [i for b in bins for i in b]
    lens = np.fromiter((len(input_ids[i]) for i in order), dtype=np.int64, count=len(order))
    flat_ids = (
        np.concatenate([np.asarray(input_ids[i], dtype=np.int32) for i in order]) if order else np.zeros(0, np.int32)
    )
    flat_labels = (
        np.concatenate([np.asarray(labels[i], dtype=np.int32) for i in order]) if order else np.zeros(0, np.int32)
    )
    # position ids without a Python loop per token: a running arange reset at each example start
    total = int(lens.sum())
    starts = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    pos = np.arange(total, dtype=np.int64) - np.repeat(starts, lens)
    per_bin = np.array([len(b) for b in bins], dtype=np.int64)
    bin_lens = np.add.reduceat(lens, np.concatenate([[0], np.cumsum(per_bin)[:-1]])) if bins else np.zeros(0, np.int64)
    offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    np.cumsum(bin_lens, out=offsets[1:])
    return Rows(
        input_ids=flat_ids,
        labels=flat_labels,
        position_ids=pos.astype(np.int32),
        offsets=offsets,
        num_examples=per_bin.astype(np.int32),
        example_ids=[[example_ids[i] for i in b] for b in bins],
    )


def build_padded_rows(
    input_ids: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    example_ids: Sequence[str],
    seq_len: int,
    pad_token_id: int,
) -> Rows:
    """One example per row, padded to seq_len with pad_token_id (labels -100 on padding).

    position_ids run 0..seq_len-1 straight through the padding: padding comes after the example, so under a
    causal mask it never influences the example's tokens.
    """
    n = len(input_ids)
    ids = np.full((n, seq_len), pad_token_id, dtype=np.int32)
    lab = np.full((n, seq_len), IGNORE, dtype=np.int32)
    real = 0
    for k in range(n):
        m = len(input_ids[k])
        if m > seq_len:
            raise ValueError(f"example {example_ids[k]} has {m} tokens > seq_len {seq_len}")
        ids[k, :m] = input_ids[k]
        lab[k, :m] = labels[k]
        real += m
    rows = Rows(
        input_ids=ids.reshape(-1),
        labels=lab.reshape(-1),
        position_ids=np.tile(np.arange(seq_len, dtype=np.int32), n),
        offsets=np.arange(n + 1, dtype=np.int64) * seq_len,
        num_examples=np.ones(n, dtype=np.int32),
        example_ids=[[e] for e in example_ids],
    )
    rows.pad_tokens = n * seq_len - real
    return rows


def build_pair_rows(
    input_ids: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    pair_ids: Sequence[str],
    cuts: Sequence[int],
    bins: list[list[int]],
    seq_len: int | None = None,
    pad_token_id: int = 0,
) -> Rows:
    """Rows of preference pairs: item k is pair k's chosen sequence (its first cuts[k] tokens) followed by its
    rejected one; `bins` group items into rows (a packer's output over the items' whole lengths, or one item per
    row). Each pair's two sequences stay adjacent, chosen first, as sequences of their own (position_ids restart
    at 0 at each; example_ids "<pair id>/chosen", "<pair id>/rejected"; num_examples counts sequences). With
    `seq_len`, every row is padded to it with pad_token_id (labels IGNORE), position_ids running on from the last
    sequence's, so the padding never reads as a sequence of its own."""
    seq_ids, seq_labels, seq_names = [], [], []
    for ids, lab, pid, c in zip(input_ids, labels, pair_ids, cuts):
        seq_ids += [ids[:c], ids[c:]]
        seq_labels += [lab[:c], lab[c:]]
        seq_names += [f"{pid}/chosen", f"{pid}/rejected"]
    rows = build_packed_rows(seq_ids, seq_labels, seq_names, [[s for k in b for s in (2 * k, 2 * k + 1)] for b in bins])
    if seq_len is None:
        return rows
    n = rows.num_rows
    lens = np.diff(rows.offsets)
    if (lens > seq_len).any():
        raise ValueError(f"a pair row has {int(lens.max())} tokens > seq_len {seq_len}")
    ids = np.full((n, seq_len), pad_token_id, dtype=np.int32)
    lab = np.full((n, seq_len), IGNORE, dtype=np.int32)
    pos = np.zeros((n, seq_len), dtype=np.int32)
    for r in range(n):
        a, b = rows.offsets[r], rows.offsets[r + 1]
        m = b - a
        ids[r, :m] = rows.input_ids[a:b]
        lab[r, :m] = rows.labels[a:b]
        pos[r, :m] = rows.position_ids[a:b]
        pos[r, m:] = np.arange(int(pos[r, m - 1]) + 1, int(pos[r, m - 1]) + 1 + seq_len - m)
    padded = Rows(
        input_ids=ids.reshape(-1),
        labels=lab.reshape(-1),
        position_ids=pos.reshape(-1),
        offsets=np.arange(n + 1, dtype=np.int64) * seq_len,
        num_examples=rows.num_examples,
        example_ids=rows.example_ids,
    )
    padded.pad_tokens = n * seq_len - int(lens.sum())
    return padded


def packing_efficiency(real_tokens: int, num_rows: int, seq_len: int) -> float:
    """Real tokens / (rows * seq_len): 1.0 means no padding would be needed to batch the rows at seq_len."""
    return real_tokens / (num_rows * seq_len) if num_rows else 0.0


def split_by_position_ids(position_ids: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) of each example in a packed row: a new example begins wherever position_ids is 0."""
    p = np.asarray(position_ids)
    starts = np.flatnonzero(p == 0).tolist()
    ends = starts[1:] + [len(p)]
    return list(zip(starts, ends))
