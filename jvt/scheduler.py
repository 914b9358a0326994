"""Scheduler: continuous batching over KV slots, chunked prefill, preemption, KV retention.

It owns the waiting and running queues and every KV-store call that changes a slot (reserve,
share, release, fence, retire). Each step packs one decode token of every decoding sequence and
prefill chunks within the token budget. When the physical budget runs out it first evicts
retained slots (finished sequences kept for sessions and prefix sharing, least recently used
first), then preempts the youngest running sequence: its KV is swapped out to host memory and
back in when it is re-admitted ("swap"), or dropped and recomputed ("recompute").
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
from collections.abc import Callable

import numpy as np

from jvt.kv import KVCacheFull
from jvt.prefix import PrefixIndex
from jvt.types import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrival = itertools.count()
# Structured outputs in K-step calls (refusal_steps): the host time of a call with
# structured-output rows that the device does not hide (masks, checks, no one-step overlap),
# in decode iterations: ~6 ms against a 29 ms iteration for SmolLM2 at batch 8 on the CPU.
CALL_OVERHEAD = 0.25
REFUSAL_PRIOR = 0.125  # a new sequence's refusal rate
REFUSAL_DECAY = 1 / 16  # weight of each checked draw in a sequence's refusal rate


def refusal_steps(rate: float, most: int) -> int:
    """Iterations of a K-step call whose structured-output rows refuse a draw made without
    the mask at ``rate``: a refusal wastes the rest of its row's call, so a row keeps
    E(K) = (1 - (1 - rate)^K) / rate tokens per call of K + CALL_OVERHEAD iterations; the K in
    [2, most] with the most tokens per iteration (>= 2 so that draws keep being checked; 2 was
    never slower than 1, measured)."""
    def kept(k):
        return k if rate == 0 else (1 - (1 - rate) ** k) / rate
    return max(range(2, most + 1), key=lambda k: kept(k) / (k + CALL_OVERHEAD))


class Sequence:
    """The state of one request: its tokens, its slot and how much of its KV is computed.

    tokens holds the prompt and every generated token the host has read back; ``pending`` counts
    tokens sampled by enqueued steps and not read back yet (one with the one-step lag, up to
    decode_steps after a K-step decode call).
    Positions [0, num_computed) of the slot hold (or are being given) the KV of the sequence;
    while it waits after a swap-out, ``swapped`` holds that KV on the host instead (no slot).
    """

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 seed: int, owner: object | None = None):
        self.request_id = request_id
        self.tokens = list(prompt_ids)
        self.num_prompt = len(prompt_ids)
        self.params = params
        self.seed = seed
        self.owner = owner  # a Session keeping this slot between turns, or None
        self.order = next(_arrival)  # age: smaller is older
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.slot: int | None = None
        self.num_computed = 0
        self.swapped: np.ndarray | None = None  # KV of [0, num_computed) while swapped out
        self.pending = 0
        self.prefix_reused = 0
        self.num_preemptions = 0
        self.penalty_rows_written = False  # since the sequence got its slot (jvt.runner)
        # structured outputs: how often K-step draws made without the mask were refused by
        # the host, recent draws weighing most (Engine._postprocess, refusal_steps)
        self.refusal_rate = REFUSAL_PRIOR

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def decoding(self) -> bool:
        """Whether its one input left is its last sampled token: on the device (pending), or
        read back before this schedule (a call with structured-output rows is, and a K-step
        call's draws the constraint refuses are discarded up to the last kept token)."""
        if self.pending:
            return self.num_computed >= len(self.tokens)
        return self.num_output > 0 and self.num_computed == len(self.tokens) - 1

    @property
    def kv_valid(self) -> int:
        """Positions whose KV belongs to host-known tokens."""
        return min(self.num_computed, len(self.tokens))

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, slot={self.slot}, "
                f"len={len(self.tokens)}+{self.pending}, computed={self.num_computed})")


@dataclasses.dataclass
class Entry:
    """One sequence's rows in a step: n tokens at positions [start, start + n)."""

    seq: Sequence
    start: int
    tokens: list[int]  # host token ids of the rows; empty for a decode row fed on device
    samples: bool  # the last row's sampled token is kept (end of prefill, or decode)
    counter: int  # index among the outputs of the token this entry samples (the first one)
    steps: int = 1  # decode iterations of a K-step call (its one row feeds positions
    #                 start .. start + steps - 1 and samples steps tokens)

    @property
    def n(self) -> int:
        return len(self.tokens) or 1

    @property
    def kv_end(self) -> int:
        """The KV length of the sequence once this entry has run."""
        return self.start + self.n + self.steps - 1

    @property
    def from_device(self) -> bool:
        return not self.tokens


@dataclasses.dataclass
class StepPlan:
    entries: list[Entry]

    @property
    def num_tokens(self) -> int:
        return sum(e.n for e in self.entries)

    @property
    def steps(self) -> int:
        """Decode iterations of the call: > 1 only for a pure-decode K-step call."""
        return max((e.steps for e in self.entries), default=1)


@dataclasses.dataclass
class Retained:
    """A finished sequence's slot kept for a later turn (owner) or for prefix sharing."""

    tokens: list[int]  # the KV of tokens[:len(tokens)] is in the slot
    owner: object | None
    num_prompt: int  # tokens[:num_prompt] were its prompt


class Scheduler:
    """Decides each step's work and keeps the KV store's slots consistent with it.

    Args:
      store: the KV store (reserve/share/release/fence/retire; raises KVCacheFull).
      max_num_seqs: slots. max_num_batched_tokens: tokens per step. prefill_chunk: most prompt
      tokens of one sequence per step. max_model_len: total tokens of a sequence.
      enable_prefix_sharing: share chunk-aligned prompt prefixes between slots and keep finished
      sequences' slots around for it.
      preemption_mode: "swap" (copy a victim's KV to host memory and back, store.swap_out /
      swap_in) or "recompute" (drop it). swap_space_bytes: most host bytes held by swapped
      sequences; a victim that would exceed it is recomputed.
      wait_device: blocks until the device has finished every enqueued step (without reading
      its results back); called before a slot is swapped out, since the step in flight may
      still be writing it.
      decode_steps: most decode iterations of a step whose every row is a decode row, when
      no request waits (EngineConfig.decode_steps).
    """

    def __init__(self, store, *, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_chunk: int, max_model_len: int, enable_prefix_sharing: bool,
                 preemption_mode: str, swap_space_bytes: int, wait_device: Callable[[], None],
                 decode_steps: int = 1):
        self.store = store
        self.decode_steps = decode_steps
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk = prefill_chunk
        self.max_model_len = max_model_len
        self.enable_prefix_sharing = enable_prefix_sharing
        self.preemption_mode = preemption_mode
        self.swap_space_bytes = swap_space_bytes
        self.wait_device = wait_device
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # oldest first
        self.retained: collections.OrderedDict[int, Retained] = collections.OrderedDict()  # LRU
        self.free_slots: list[int] = list(range(max_num_seqs - 1, -1, -1))
        self.draining: list[tuple[int, int]] = []  # (fence step at release, slot)
        self.shared_upto = [0] * max_num_seqs  # tokens shared into or out of each slot
        self.index = PrefixIndex(store.tokens_per_chunk)
        self.fence_step = -1
        self.retired_step = -1
        self.num_preemptions = 0
        self.num_swaps = 0
        self.swapped_bytes = 0  # host bytes held by swapped-out sequences

    # -- requests ------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` (stop, length, abort or error); its slot is retained or released (an
        aborted or failed sequence's KV is never kept)."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        if seq.swapped is not None:
            self._free_swapped(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq.slot is None:
            return
        slot, seq.slot = seq.slot, None
        keep = seq.owner is not None or self.enable_prefix_sharing
        if keep and reason not in ("abort", "error") and seq.kv_valid > 0:
            if self.enable_prefix_sharing:  # including chunks its last steps computed
                self.index.register(slot, seq.tokens, seq.kv_valid)
            self.retained[slot] = Retained(seq.tokens[:seq.kv_valid], seq.owner,
                                           seq.num_prompt)
        else:
            self._release(slot)

    def forget(self, owner: object) -> None:
        """Release the retained slot of ``owner`` (a closed session), if any."""
        for slot, r in list(self.retained.items()):
            if r.owner is owner:
                del self.retained[slot]
                self._release(slot)

    # -- fence / retire ------------------------------------------------------------------

    def fence(self, step: int) -> None:
        """Step ``step`` was enqueued on the device."""
        self.fence_step = step
        self.store.fence(step)

    def retire(self, step: int) -> None:
        """Every step <= ``step`` finished on the device: drained slots become free."""
        self.retired_step = step
        self.store.retire(step)
        still = []
        for fence, slot in self.draining:
            if fence <= step:
                self.free_slots.append(slot)
            else:
                still.append((fence, slot))
        self.draining = still

    def _release(self, slot: int) -> None:
        self.store.release(slot)
        self.index.drop(slot)
        self.shared_upto[slot] = 0
        if self.retired_step >= self.fence_step:
            self.free_slots.append(slot)
        else:
            self.draining.append((self.fence_step, slot))

    # -- scheduling ----------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """The next step's entries, or None when nothing can run now."""
        for seq in self.running:  # KV enqueued by earlier steps may be shared from now on
            if self.enable_prefix_sharing:
                self.index.register(seq.slot, seq.tokens, seq.kv_valid)
        entries: list[Entry] = []
        budget = self.max_num_batched_tokens
        preempted = False
        steps = self._decode_steps()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted below to make room
                continue
            entry = self._next_entry(seq, budget, steps)
            if entry is None:
                continue
            fits = self._reserve(seq.slot, entry.kv_end)
            if not fits and entry.steps > 1:  # one step fits more often: no preemption for K
                entry.steps = 1
                fits = self._reserve(seq.slot, entry.kv_end)
            while not fits and not self.draining:
                # Released chunks still draining come back within a step: wait for them
                # rather than preempt. Otherwise the youngest running sequence gives way.
                victim = self.running[-1]  # running is kept oldest first
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
                fits = self._reserve(seq.slot, entry.kv_end)
            if fits:
                entries.append(entry)
                budget -= entry.n
        if not preempted:
            self._admit(entries, budget)
        for e in entries:
            e.seq.num_computed = e.kv_end
            if e.samples:
                e.seq.pending += e.steps
        return StepPlan(entries) if entries else None

    def _decode_steps(self) -> int:
        """Iterations the decode entries of this step may run: decode_steps when every running
        sequence decodes (``Sequence.decoding``), none with a structured-output constraint
        draws through a top-k / top-p / min-p filter (its tokens cannot be drawn unmasked and
        checked after, jvt.sampling.sample), and no request waits (a waiting request is
        admitted by the next step, not after a K-step call); else 1. With structured-output
        sequences running, fewer when they refuse unmasked draws often (refusal_steps of
        their mean refusal rate)."""
        if self.decode_steps == 1 or self.waiting:
            return 1
        if any(not seq.decoding or (seq.params.constraint is not None and seq.params.filtered)
               for seq in self.running):
            return 1
        rates = [seq.refusal_rate for seq in self.running if seq.params.constraint is not None]
        if not rates:
            return self.decode_steps
        return refusal_steps(sum(rates) / len(rates), self.decode_steps)

    def _next_entry(self, seq: Sequence, budget: int, steps: int = 1) -> Entry | None:
        known = len(seq.tokens)
        total = known + seq.pending
        left = min(seq.params.max_tokens - seq.num_output - seq.pending,
                   self.max_model_len - total)
        if seq.decoding and not seq.pending:  # decode from the host's copy of its last token
            return Entry(seq, known - 1, seq.tokens[-1:], True, seq.num_output,
                         max(1, min(steps, left)))
        if seq.num_computed < known:  # prefill (or recompute after preemption)
            n = min(known - seq.num_computed, self.prefill_chunk, budget)
            start = seq.num_computed
            return Entry(seq, start, seq.tokens[start:start + n], start + n == known,
                         seq.num_output)
        # Decode: the input is the last token sampled by the step in flight, taken on the
        # device. Nothing to do when that token is the last one (finishing is the engine's job).
        if not seq.pending or left <= 0:
            return None
        return Entry(seq, total - 1, [], True, seq.num_output + seq.pending, min(steps, left))

    def _admit(self, entries: list[Entry], budget: int) -> None:
        skipped = []
        while self.waiting and budget > 0 and len(entries) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if seq.pending or not self._place(seq):
                skipped.append(seq)
                if not seq.pending:
                    break  # FIFO: no younger request overtakes one that does not fit
                continue
            entry = self._next_entry(seq, budget)
            if not self._reserve(seq.slot, entry.kv_end):
                self._unplace(seq)
                skipped.append(seq)
                break
            if seq.swapped is not None:
                self._swap_in(seq)
            seq.status = Status.RUNNING
            seq.penalty_rows_written = False
            self.running.append(seq)
            entries.append(entry)
            budget -= entry.n
        self.waiting.extendleft(reversed(skipped))
        self.running.sort(key=lambda s: s.order)

    def _place(self, seq: Sequence) -> bool:
        """Give ``seq`` a slot: its owner's retained slot, else a free one (evicting LRU).

        A swapped-out sequence gets a free slot and keeps its num_computed: its KV comes back
        from the host (no retained slot or shared prefix is mapped under it). A sequence that
        asks for prompt_logprobs reuses no KV: every prompt position is computed.
        """
        reuse_kv = seq.params.prompt_logprobs is None
        if seq.swapped is not None:
            return self._take_free_slot(seq)
        for slot, r in self.retained.items():
            if seq.owner is not None and r.owner is seq.owner:
                del self.retained[slot]
                reuse = _common_prefix(r.tokens, seq.tokens, len(seq.tokens) - 1) \
                    if reuse_kv else 0
                if reuse >= self.shared_upto[slot]:  # rewriting from there spares shared chunks
                    self.index.truncate(slot, reuse)
                    seq.slot, seq.num_computed, seq.prefix_reused = slot, reuse, reuse
                    return True
                self._release(slot)
                break
        if seq.owner is None and reuse_kv and self._continue_retained(seq):
            return True
        if not self._take_free_slot(seq):
            return False
        seq.num_computed = 0
        if self.enable_prefix_sharing and reuse_kv:
            src, n = self.index.longest(seq.tokens, len(seq.tokens) - 1, exclude=seq.slot)
            if src is not None:
                shared = self.store.share(seq.slot, src, n)
                seq.num_computed = seq.prefix_reused = shared
                self.shared_upto[seq.slot] = shared
                self.shared_upto[src] = max(self.shared_upto[src], shared)
                if src in self.retained:
                    self.retained.move_to_end(src)
        return True

    def _continue_retained(self, seq: Sequence) -> bool:
        """Give an owner-less ``seq`` the retained owner-less slot whose request it continues
        (the next turn of a conversation sent as a whole, as through the HTTP API): that
        request's whole prompt repeated, and as much of its output as matches, reused to the
        token (prefix sharing shares whole chunks only). The slot with the most such tokens
        wins."""
        best, reuse = None, 0
        for slot, r in self.retained.items():
            if r.owner is None:
                n = _continues(r, seq.tokens)
                if n > reuse and n >= self.shared_upto[slot]:
                    best, reuse = slot, n
        if best is None:
            return False
        del self.retained[best]
        self.index.truncate(best, reuse)
        seq.slot, seq.num_computed, seq.prefix_reused = best, reuse, reuse
        return True

    def _take_free_slot(self, seq: Sequence) -> bool:
        """Give ``seq`` a free slot, evicting the least recently used retained one if needed."""
        if not self.free_slots and self.retained:
            self._release(self.retained.popitem(last=False)[0])
        if not self.free_slots:
            return False
        seq.slot = self.free_slots.pop()
        return True

    def _unplace(self, seq: Sequence) -> None:
        slot, seq.slot = seq.slot, None
        if seq.swapped is None:  # a swapped-out sequence still has its KV on the host
            seq.num_computed = 0
        self._release(slot)

    def _reserve(self, slot: int, n_tokens: int) -> bool:
        """Reserve, evicting retained slots (LRU) while the budget is short; False if still."""
        while True:
            try:
                self.store.reserve(slot, n_tokens)
                return True
            except KVCacheFull:
                if not self.retained:
                    return False
                self._release(self.retained.popitem(last=False)[0])

    def _preempt(self, seq: Sequence) -> None:
        """Free the slot of running ``seq``, which waits at the head of the queue with its KV
        swapped out to the host (swap mode, within swap_space_bytes) or to be recomputed."""
        self.running.remove(seq)
        slot, seq.slot = seq.slot, None
        if self._can_swap(seq):
            self._swap_out(seq, slot)
        else:
            seq.num_computed = 0
        self._release(slot)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _can_swap(self, seq: Sequence) -> bool:
        size = seq.num_computed * self.store.token_bytes
        return (self.preemption_mode == "swap"
                and self.swapped_bytes + size <= self.swap_space_bytes)

    def _swap_out(self, seq: Sequence, slot: int) -> None:
        """Copy the KV of positions [0, num_computed) of ``slot`` to ``seq.swapped``.

        Those positions are written once the enqueued steps finish, and the step in flight may
        be one of them: wait for the device first. num_computed stays as it is.
        """
        self.wait_device()
        seq.swapped = self.store.swap_out(slot, seq.num_computed)
        self.swapped_bytes += seq.swapped.nbytes
        self.num_swaps += 1

    def _swap_in(self, seq: Sequence) -> None:
        """Copy ``seq.swapped`` into its new slot (reserved to beyond num_computed): the
        sequence goes on as if never preempted, from the token after num_computed."""
        self.store.swap_in(seq.slot, seq.swapped)
        self._free_swapped(seq)

    def _free_swapped(self, seq: Sequence) -> None:
        self.swapped_bytes -= seq.swapped.nbytes
        seq.swapped = None

    def evict_all_retained(self) -> bool:
        """Release every retained slot; True if there was any (a stuck scheduler's last resort)."""
        had = bool(self.retained)
        while self.retained:
            self._release(self.retained.popitem(last=False)[0])
        return had


def _continues(r: Retained, tokens: list[int]) -> int:
    """How many of ``r``'s tokens ``tokens`` repeats from the start, if that is all of r's
    prompt at least (0 otherwise; at least one token of ``tokens`` is left to compute)."""
    need = min(r.num_prompt, len(r.tokens))
    if need == 0 or len(tokens) <= need or r.tokens[need - 1] != tokens[need - 1]:
        return 0
    reuse = _common_prefix(r.tokens, tokens, len(tokens) - 1)
    return reuse if reuse >= need else 0


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
