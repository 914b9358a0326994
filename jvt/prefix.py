"""PrefixIndex: which slot holds the KV of which chunk-aligned token prefix.

A prefix of k whole chunks is keyed by a chained hash of its chunks (the hash of chunk k
covers chunks 0..k), so a lookup walks a prompt's chunks once. Hits are verified against the
registered tokens, so a hash collision can never map wrong KV.
"""

from __future__ import annotations


class PrefixIndex:
    """Maps chunk-aligned prefixes to the slots whose KV holds them (live or retained)."""

    def __init__(self, tokens_per_chunk: int):
        self.tokens_per_chunk = tokens_per_chunk
        self._slots_of: dict[int, set[int]] = {}  # prefix hash -> slots holding that prefix
        self._hashes: dict[int, list[int]] = {}  # slot -> hash of each registered prefix
        self._tokens: dict[int, list[int]] = {}  # slot -> the registered tokens

    def register(self, slot: int, tokens: list[int], n_tokens: int) -> None:
        """Record that ``slot`` holds valid KV for ``tokens[:n_tokens]`` (whole chunks count)."""
        tpc = self.tokens_per_chunk
        hashes = self._hashes.setdefault(slot, [])
        held = self._tokens.setdefault(slot, [])
        for k in range(len(hashes), n_tokens // tpc):
            chunk = tuple(tokens[k * tpc:(k + 1) * tpc])
            h = hash((hashes[-1] if hashes else 0, chunk))
            hashes.append(h)
            held.extend(chunk)
            self._slots_of.setdefault(h, set()).add(slot)

    def truncate(self, slot: int, n_tokens: int) -> None:
        """Forget the prefixes of ``slot`` longer than ``n_tokens`` (its KV beyond is rewritten)."""
        hashes = self._hashes.get(slot, [])
        keep = n_tokens // self.tokens_per_chunk
        for h in hashes[keep:]:
            slots = self._slots_of[h]
            slots.discard(slot)
            if not slots:
                del self._slots_of[h]
        del hashes[keep:]
        if slot in self._tokens:
            del self._tokens[slot][keep * self.tokens_per_chunk:]

    def drop(self, slot: int) -> None:
        """Forget everything ``slot`` held (it was released)."""
        self.truncate(slot, 0)
        self._hashes.pop(slot, None)
        self._tokens.pop(slot, None)

    def longest(self, tokens: list[int], limit: int, exclude: int | None = None
                ) -> tuple[int | None, int]:
        """(slot, n_tokens): the longest chunk-aligned prefix of ``tokens[:limit]`` some slot
        other than ``exclude`` holds; (None, 0) when none holds even one chunk."""
        tpc = self.tokens_per_chunk
        best, h = (None, 0), 0
        for k in range(limit // tpc):
            chunk = tuple(tokens[k * tpc:(k + 1) * tpc])
            h = hash((h, chunk))
            slots = [s for s in self._slots_of.get(h, ()) if s != exclude]
            match = [s for s in slots if self._tokens[s][:(k + 1) * tpc] == tokens[:(k + 1) * tpc]]
            if not match:
                break
            best = (min(match), (k + 1) * tpc)
        return best

    def __len__(self) -> int:
        return len(self._slots_of)
