"""The scheduler against a pure-Python KV store that models physical chunks.

The fake store keeps, for every physical chunk, the token id written at each of its positions;
the fake model "attends" by reading a sequence's prefix back through its slot's chunk map and
derives the next token from it. So a scheduling bug that maps, shares, reuses or releases the
wrong chunks (or swaps the wrong KV out and in) changes the generated tokens, which are
compared with a direct reference.
"""

import random

import numpy as np
import pytest

from jvt.kv import KVCacheFull
from jvt.scheduler import Scheduler, Sequence, Status
from jvt.types import SamplingParams

VOCAB = 50
STOP = 0  # the fake model's EOS


class FakeStore:
    """reserve/share/release/fence/retire with refcounted chunks and deferred release, and
    swap_out/swap_in of a slot's first tokens (one byte per token: its id)."""

    def __init__(self, slots: int, tokens_per_chunk: int, budget_chunks: int):
        self.tokens_per_chunk = tokens_per_chunk
        self.token_bytes = 1
        self.budget_chunks = budget_chunks
        self.chunks = [[] for _ in range(slots)]  # slot -> physical chunk ids
        self.refs: dict[int, int] = {}  # chunk id -> refcount
        self.data: dict[int, dict[int, int]] = {}  # chunk id -> offset -> token id
        self.free: list[int] = []
        self.created = 0
        self.draining: dict[int, int] = {}  # slot -> fence at release
        self.fence_step = self.retired_step = -1
        self.unfinished: set[tuple[int, int]] = set()  # (slot, pos) written by steps in flight

    def _new_chunk(self) -> int:
        if self.free:
            return self.free.pop()
        self.created += 1
        return self.created - 1

    def _available(self) -> int:
        return len(self.free) + self.budget_chunks - self.created

    def reserve(self, slot, n_tokens):
        assert slot not in self.draining, f"reserve into draining slot {slot}"
        need = -(-n_tokens // self.tokens_per_chunk) - len(self.chunks[slot])
        if need > self._available():
            raise KVCacheFull("full", need, self._available(), 1)
        for _ in range(max(need, 0)):
            c = self._new_chunk()
            self.refs[c] = 1
            self.data[c] = {}
            self.chunks[slot].append(c)

    def apply_pending(self):
        pass  # the fake maps at reserve time

    def share(self, dst, src, n_tokens):
        assert not self.chunks[dst] and dst not in self.draining and src not in self.draining
        k = min(n_tokens // self.tokens_per_chunk, len(self.chunks[src]))
        for c in self.chunks[src][:k]:
            self.refs[c] += 1
            self.chunks[dst].append(c)
        return k * self.tokens_per_chunk

    def release(self, slot):
        if not self.chunks[slot]:
            return
        assert slot not in self.draining
        self.draining[slot] = self.fence_step
        self._retire()

    def fence(self, step):
        assert step > self.fence_step
        self.fence_step = step

    def retire(self, step):
        self.retired_step = step
        self._retire()

    def _retire(self):
        for slot, fence in list(self.draining.items()):
            if fence <= self.retired_step:
                for c in self.chunks[slot]:
                    self.refs[c] -= 1
                    if self.refs[c] == 0:
                        del self.refs[c]
                        self.free.append(c)
                self.chunks[slot] = []
                del self.draining[slot]

    def chunks_in_use(self) -> int:
        return len(self.refs)

    def swap_out(self, slot, n_tokens):
        assert not any((slot, p) in self.unfinished for p in range(n_tokens)), \
            "swap_out of positions a step in flight is still writing"
        tokens = self.read(slot, n_tokens)
        assert None not in tokens
        return np.array(tokens, np.uint8)

    def swap_in(self, slot, data):
        assert len(self.chunks[slot]) * self.tokens_per_chunk >= len(data)
        for pos, token in enumerate(data):
            self.write(slot, pos, int(token))

    def wait_device(self):
        self.unfinished.clear()  # the fake device finishes every enqueued step

    # The fake device: write and read token ids through a slot's chunk map.
    def write(self, slot, pos, token):
        assert slot not in self.draining
        c = self.chunks[slot][pos // self.tokens_per_chunk]
        assert self.refs[c] == 1 or pos % self.tokens_per_chunk in self.data[c] and \
            self.data[c][pos % self.tokens_per_chunk] == token, "write into a shared chunk"
        self.data[c][pos % self.tokens_per_chunk] = token

    def read(self, slot, n):
        tpc = self.tokens_per_chunk
        return [self.data[self.chunks[slot][p // tpc]].get(p % tpc) for p in range(n)]


def next_token(prefix: list[int], seed: int) -> int:
    return hash((tuple(prefix), seed)) % VOCAB


def reference(prompt, max_tokens, seed, max_model_len):
    tokens = list(prompt)
    while True:
        tokens.append(next_token(tokens, seed))
        out = len(tokens) - len(prompt)
        if tokens[-1] == STOP or out >= max_tokens or len(tokens) >= max_model_len:
            return tokens[len(prompt):]


class Driver:
    """The engine's loop in miniature: schedule, run (fake), read back one step late."""

    def __init__(self, store, sched, max_model_len):
        self.store, self.sched, self.max_model_len = store, sched, max_model_len
        self.step = 0
        self.inflight = None
        self.max_tokens_seen = 0

    def run_step(self, budget):
        plan = self.sched.schedule()
        results = None
        if plan is not None:
            assert plan.num_tokens <= budget
            slots = [e.seq.slot for e in plan.entries]
            assert len(set(slots)) == len(slots)
            results = [self._execute(e) for e in plan.entries]
            self.store.unfinished |= _writes(plan)
            self.step += 1
            self.sched.fence(self.step)
        if self.inflight is not None:
            self._postprocess(*self.inflight)
        self.inflight = (plan, results, self.step) if plan is not None else None
        return plan

    def _execute(self, e):
        slot = e.seq.slot
        assert len(self.store.chunks[slot]) * self.store.tokens_per_chunk >= e.start + e.n
        true_tokens = e.seq.tokens + e.seq.device_tokens
        inputs = e.tokens or [true_tokens[e.start]]
        assert inputs == true_tokens[e.start:e.start + e.n]
        for i, t in enumerate(inputs):
            self.store.write(slot, e.start + i, t)
        # "Attention": the whole prefix as the slot's chunks hold it.
        prefix = self.store.read(slot, e.start + e.n)
        token = next_token(prefix, e.seq.seed)
        if e.samples:
            e.seq.device_tokens.append(token)
        return token

    def _postprocess(self, plan, results, step):
        self.store.retire(step - 1)  # the fake device finished everything before this step
        self.store.unfinished -= _writes(plan)
        self.sched.retire(step)
        for e, token in zip(plan.entries, results):
            if not e.samples:
                continue
            seq = e.seq
            seq.pending -= 1
            seq.device_tokens.pop(0)
            if seq.status is Status.FINISHED:
                continue
            seq.tokens.append(token)
            if token == STOP or seq.num_output >= seq.params.max_tokens or \
                    len(seq.tokens) >= self.max_model_len:
                self.sched.finish(seq, "stop" if token == STOP else "length")


def _writes(plan):
    return {(e.seq.slot, e.start + i) for e in plan.entries for i in range(e.n)}


def make(slots=4, tpc=4, budget_chunks=40, batched=24, prefill_chunk=7, max_model_len=64,
         sharing=True, mode="swap", swap_space=1 << 30):
    store = FakeStore(slots, tpc, budget_chunks)
    sched = Scheduler(store, max_num_seqs=slots, max_num_batched_tokens=batched,
                      prefill_chunk=prefill_chunk, max_model_len=max_model_len,
                      enable_prefix_sharing=sharing, preemption_mode=mode,
                      swap_space_bytes=swap_space, wait_device=store.wait_device)
    return store, sched, Driver(store, sched, max_model_len)


def new_seq(rid, prompt, max_tokens, seed, owner=None):
    seq = Sequence(str(rid), prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens),
                   seed, owner)
    seq.device_tokens = []
    return seq


def drain(store, sched, driver, budget, limit=100000):
    idle = 0  # consecutive steps with nothing to run and nothing in flight
    for _ in range(limit):
        if not sched.has_work() and driver.inflight is None:
            break
        stalled = driver.run_step(budget) is None and driver.inflight is None
        idle = idle + 1 if stalled else 0
        if idle > 2:  # a step that only preempted is fine; a scheduler that stays idle is not
            raise AssertionError(f"stuck: waiting={list(sched.waiting)}")
    else:
        raise AssertionError("did not finish")


def assert_no_leak(store, sched, slots):
    sched.evict_all_retained()
    sched.retire(sched.fence_step)
    store.retire(store.fence_step)
    assert store.chunks_in_use() == 0
    assert sorted(sched.free_slots) == list(range(slots))
    assert not sched.draining and len(sched.index) == 0
    assert sched.swapped_bytes == 0


def run_requests(reqs, **kw):
    store, sched, driver = make(**kw)
    seqs = []
    for rid, (prompt, max_tokens, seed) in enumerate(reqs):
        seqs.append(new_seq(rid, prompt, max_tokens, seed))
        sched.add(seqs[-1])
    drain(store, sched, driver, kw.get("batched", 24))
    for seq, (prompt, max_tokens, seed) in zip(seqs, reqs):
        assert seq.status is Status.FINISHED
        assert seq.tokens[len(prompt):] == reference(prompt, max_tokens, seed, kw.get(
            "max_model_len", 64)), seq
    return store, sched, seqs


def test_single_request_matches_reference_across_chunk_boundaries():
    for n in (1, 3, 4, 5, 7, 8, 17):
        store, sched, _ = run_requests([(list(range(1, n + 1)), 9, 3)])
        assert_no_leak(store, sched, 4)


def test_more_requests_than_slots_all_finish_correctly():
    rng = random.Random(0)
    reqs = [([rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 30))], rng.randint(1, 20),
             i) for i in range(23)]
    store, sched, _ = run_requests(reqs)
    assert_no_leak(store, sched, 4)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_tiny_budget_forces_preemption_and_outputs_stay_identical(mode):
    rng = random.Random(1)
    reqs = [([rng.randrange(1, VOCAB) for _ in range(rng.randint(5, 20))], 30, i)
            for i in range(12)]
    store, sched, _ = run_requests(reqs, budget_chunks=14, sharing=False, mode=mode)
    assert sched.num_preemptions > 0
    assert (sched.num_swaps == sched.num_preemptions) if mode == "swap" else not sched.num_swaps
    assert store.created <= 14
    assert_no_leak(store, sched, 4)


def test_prefix_sharing_maps_shared_chunks_and_keeps_outputs():
    rng = random.Random(2)
    common = [rng.randrange(1, VOCAB) for _ in range(13)]
    reqs = [(common + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 9))], 5, i)
            for i in range(10)]
    store, sched, seqs = run_requests(reqs, prefill_chunk=16)
    # The first request prefills the 12 chunk-aligned tokens; later ones share them.
    assert sum(s.prefix_reused for s in seqs) >= 12 * 8
    assert all(s.prefix_reused % 4 == 0 for s in seqs)
    assert_no_leak(store, sched, 4)


def test_session_reuses_its_slot_and_prefills_only_new_tokens():
    store, sched, driver = make(budget_chunks=60, max_model_len=200)
    owner = object()
    history = [5, 6, 7]
    for turn in range(4):
        prompt = history + [10 + turn, 11, 12]
        seq = new_seq(f"t{turn}", prompt, 6, 42, owner=owner)
        sched.add(seq)
        drain(store, sched, driver, 24)
        assert seq.tokens[len(prompt):] == reference(prompt, 6, 42, 200)
        if turn:
            assert seq.prefix_reused >= len(history) - 1
        history = seq.tokens
    sched.forget(owner)
    assert_no_leak(store, sched, 4)


def test_abort_returns_every_chunk():
    store, sched, driver = make()
    seqs = [new_seq(i, list(range(1, 12 + i)), 40, i) for i in range(6)]
    for s in seqs:
        sched.add(s)
    for _ in range(5):
        driver.run_step(24)
    for s in seqs:
        sched.finish(s, "abort")
    drain(store, sched, driver, 24)
    assert all(s.finish_reason == "abort" for s in seqs)
    assert_no_leak(store, sched, 4)


@pytest.mark.parametrize("seed,mode,swap_space", [(0, "swap", 1 << 30), (1, "swap", 40),
                                                   (0, "recompute", 0)])
def test_thousand_random_requests_leak_nothing(seed, mode, swap_space):
    rng = random.Random(seed)
    store, sched, driver = make(slots=6, budget_chunks=30, batched=32, max_model_len=48,
                                mode=mode, swap_space=swap_space)
    owners = [object() for _ in range(3)]
    live, done = [], []
    for rid in range(500):
        common = [1, 2, 3, 4, 5, 6, 7, 8] if rng.random() < 0.5 else []
        prompt = common + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 20))]
        owner = rng.choice(owners) if rng.random() < 0.2 else None
        if owner is not None and any(s.owner is owner for s in live):
            owner = None  # one turn at a time per session
        seq = new_seq(rid, prompt, rng.randint(1, 24), rid, owner=owner)
        sched.add(seq)
        live.append(seq)
        for _ in range(rng.randint(0, 3)):
            driver.run_step(32)
        if rng.random() < 0.05:
            sched.finish(rng.choice(live), "abort")
        done += [s for s in live if s.status is Status.FINISHED]
        live = [s for s in live if s.status is not Status.FINISHED]
    drain(store, sched, driver, 32)
    done += live
    assert len(done) == 500 and all(s.status is Status.FINISHED for s in done)
    for s in done:
        if s.finish_reason != "abort":
            assert s.tokens[s.num_prompt:] == reference(
                s.tokens[:s.num_prompt], s.params.max_tokens, s.seed, 48), s
    # The workload exercised what it is meant to: preemption (swapped where asked, recomputed
    # where the swap space ran out), sharing, aborts, session reuse.
    assert sched.num_preemptions > 0
    if mode == "swap":
        assert 0 < sched.num_swaps and (swap_space > 40 or sched.num_swaps < sched.num_preemptions)
    else:
        assert sched.num_swaps == 0
    assert sum(s.prefix_reused for s in done if s.owner is None) > 0
    assert sum(s.prefix_reused for s in done if s.owner is not None) > 0
    assert any(s.finish_reason == "abort" for s in done)
    for owner in owners:
        sched.forget(owner)
    assert_no_leak(store, sched, 6)


def test_prefix_index_longest_truncate_drop():
    from jvt.prefix import PrefixIndex

    index = PrefixIndex(tokens_per_chunk=4)
    a = list(range(1, 14))  # 3 whole chunks + 1 token
    index.register(0, a, 13)
    index.register(1, a[:8] + [99] * 5, 13)
    assert index.longest(a, 13) == (0, 12)
    assert index.longest(a, 12) == (0, 12)
    assert index.longest(a, 11) == (0, 8)  # only whole chunks within the limit
    assert index.longest(a, 13, exclude=0) == (1, 8)
    assert index.longest([7] + a[1:], 13) == (None, 0)
    index.truncate(0, 9)  # slot 0 rewrites from position 9: chunk 2 is gone
    assert index.longest(a, 13) == (0, 8)
    index.drop(0)
    index.drop(1)
    assert index.longest(a, 13) == (None, 0) and len(index) == 0


def test_refusal_steps_shrink_k_as_refusals_grow():
    from jvt.scheduler import refusal_steps

    ks = [refusal_steps(r, 8) for r in (0.0, 0.005, 0.02, 0.05, 0.1, 0.3, 1.0)]
    assert ks[0] == 8 and ks[-1] == 2
    assert ks == sorted(ks, reverse=True) and len(set(ks)) > 3
    assert refusal_steps(0.0, 2) == 2 and refusal_steps(0.5, 16) == 2
