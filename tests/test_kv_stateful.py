"""The KV store against a pure-Python model, driven by random operation sequences (hypothesis).

The model mirrors the documented policy exactly: chunk ids are handed out from a LIFO free
list, then fresh ids up to the budget; a reserve needing more than free + never-created
chunks raises KVCacheFull and changes nothing; release tags a slot with the current fence and
retire(step) recycles slots tagged <= step (at once when that step has already retired).
"""

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jvt.kv import KVCacheFull, KVStore

SLOTS = 4
MAX_TOKENS = 300
BUDGET_CHUNKS = 8
# float32, 1 layer x 1 head x 4096: 32 KiB per token, 64 tokens per 2 MiB chunk.
SPEC = {"layers": 1, "kv_heads": 1, "head_dim": 4096, "dtype": "float32", "slots": SLOTS,
            "max_tokens": MAX_TOKENS, "budget_bytes": BUDGET_CHUNKS * (2 << 20)}


class ModelSlot:
    def __init__(self):
        self.chunks: list[int] = []
        self.reserved = 0
        self.draining = False
        self.tag = -1


class KVStoreMachine(RuleBasedStateMachine):
    DEVICE = "cpu"  # tests/test_kv_gpu.py reruns the machine on "cuda:0"

    def __init__(self):
        super().__init__()
        self.store = KVStore(**SPEC, device=self.DEVICE)
        self.tpc = self.store.tokens_per_chunk
        assert self.tpc == 64
        self.slots = [ModelSlot() for _ in range(SLOTS)]
        self.free: list[int] = []
        self.allocated = 0
        self.fence_step = -1
        self.retired = -1
        self.content: dict[tuple[int, int], float] = {}  # (chunk id, offset in chunk) -> value
        self.counter = 0

    # ---- model helpers ------------------------------------------------------------------

    def refcounts(self) -> dict[int, int]:
        rc: dict[int, int] = {}
        for s in self.slots:
            for c in s.chunks:
                rc[c] = rc.get(c, 0) + 1
        return rc

    def recycle(self, limit: int) -> None:
        """Retire every draining slot tagged <= limit, freeing chunks nothing else maps."""
        for i, s in enumerate(self.slots):
            if s.draining and s.tag <= limit:
                self.slots[i] = ModelSlot()
                still_mapped = self.refcounts()
                self.free.extend(c for c in s.chunks if c not in still_mapped)

    # ---- rules --------------------------------------------------------------------------

    @rule(slot=st.integers(0, SLOTS - 1), n=st.integers(0, MAX_TOKENS))
    def reserve(self, slot, n):
        s = self.slots[slot]
        if s.draining:
            try:
                self.store.reserve(slot, n)
            except ValueError as e:
                assert "draining" in str(e)
                return
            raise AssertionError("reserve into a draining slot must fail")
        extra = -(-n // self.tpc) - len(s.chunks)
        available = len(self.free) + BUDGET_CHUNKS - self.allocated
        if extra > available:
            before = self.store.stats()
            try:
                self.store.reserve(slot, n)
            except KVCacheFull as e:
                assert (e.needed_chunks, e.available_chunks) == (extra, available)
                after = self.store.stats()
                # The mapper may finish queued work meanwhile; bookkeeping must be unchanged.
                assert after.reserved_tokens == before.reserved_tokens
                assert (after.chunks_in_use, after.chunks_free) == (
                    before.chunks_in_use, before.chunks_free)
                return
            raise AssertionError(f"expected KVCacheFull: extra={extra} available={available}")
        self.store.reserve(slot, n)
        for _ in range(max(extra, 0)):
            if self.free:
                s.chunks.append(self.free.pop())
            else:
                s.chunks.append(self.allocated)
                self.allocated += 1
        s.reserved = max(s.reserved, n)

    @rule(dst=st.integers(0, SLOTS - 1), src=st.integers(0, SLOTS - 1), frac=st.floats(0, 1))
    def share(self, dst, src, frac):
        d, s = self.slots[dst], self.slots[src]
        n = int(frac * s.reserved)
        if dst == src or d.draining or d.chunks:
            try:
                self.store.share(dst, src, n)
            except ValueError:
                return
            raise AssertionError("share into a non-empty, draining or same slot must fail")
        got = self.store.share(dst, src, n)
        whole = n // self.tpc
        assert got == whole * self.tpc
        if whole:
            d.chunks = s.chunks[:whole]
            d.reserved = got

    @rule(slot=st.integers(0, SLOTS - 1))
    def release(self, slot):
        s = self.slots[slot]
        if s.draining:
            try:
                self.store.release(slot)
            except ValueError as e:
                assert "already draining" in str(e)
                return
            raise AssertionError("double release must fail")
        self.store.release(slot)
        if not s.chunks:
            self.slots[slot] = ModelSlot()
            return
        s.draining, s.tag = True, self.fence_step
        if s.tag <= self.retired:
            self.recycle(self.retired)

    @rule(advance=st.integers(0, 2))
    def fence(self, advance):
        self.fence_step += advance
        self.store.fence(self.fence_step)

    @precondition(lambda self: self.fence_step >= 0)
    @rule(back=st.integers(0, 3))
    def retire(self, back):
        step = max(self.fence_step - back, -1)
        self.store.retire(step)
        if step > self.retired:
            self.retired = step
            self.recycle(step)

    @rule()
    def apply_pending(self):
        self.store.apply_pending()
        st_ = self.store.stats()
        assert st_.pending_jobs == 0
        for i, s in enumerate(self.slots):
            if not s.draining:
                want = min(len(s.chunks) * self.tpc, MAX_TOKENS)
                assert st_.mapped_tokens[i] == want >= s.reserved
        for i, s in enumerate(self.slots):
            if s.draining:
                continue
            for j, c in enumerate(s.chunks):
                for off in range(0, self.tpc, 21):
                    if (c, off) in self.content and j * self.tpc + off < MAX_TOKENS:
                        k, _ = self.store.read_token(i, j * self.tpc + off, 0)
                        assert k[0, 0] == self.content[c, off], (i, j, c, off)

    @precondition(lambda self: any(s.chunks and not s.draining for s in self.slots))
    @rule(pick=st.integers(0, 1000), offset=st.sampled_from([0, 21, 42, 63]))
    def write(self, pick, offset):
        live = [i for i, s in enumerate(self.slots) if s.chunks and not s.draining]
        slot = live[pick % len(live)]
        s = self.slots[slot]
        j = pick % len(s.chunks)
        pos = j * self.tpc + offset
        if pos >= MAX_TOKENS:
            return
        self.counter += 1
        k = np.full((1, 4096), float(self.counter), np.float32)
        self.store.write_token(slot, pos, 0, k, -k)
        self.content[s.chunks[j], offset] = float(self.counter)

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def bookkeeping_matches_model(self):
        st_ = self.store.stats()
        rc = self.refcounts()
        for i, s in enumerate(self.slots):
            assert self.store.slot_chunks(i) == s.chunks, i
        assert st_.reserved_tokens == tuple(s.reserved for s in self.slots)
        assert st_.draining == tuple(s.draining for s in self.slots)
        assert st_.chunks_in_use == len(rc)
        assert st_.chunks_free == len(self.free)
        assert st_.chunks_shared == sum(1 for r in rc.values() if r > 1)
        assert st_.chunks_in_use + st_.chunks_free == self.allocated <= BUDGET_CHUNKS
        assert st_.chunks_created <= self.allocated
        assert sorted(self.free + list(rc)) == list(range(self.allocated))
        # The mapper may be mid-way: capacity never exceeds what the slot owns.
        for i, s in enumerate(self.slots):
            assert st_.mapped_tokens[i] <= min(len(s.chunks) * self.tpc, MAX_TOKENS)

    def teardown(self):
        try:
            for slot, s in enumerate(self.slots):
                if not s.draining:
                    self.store.release(slot)
            self.fence_step += 1
            self.store.fence(self.fence_step)
            self.store.retire(self.fence_step)
            st_ = self.store.stats()
            assert st_.chunks_in_use == 0 and st_.chunks_shared == 0
            assert st_.chunks_free == self.allocated
            assert st_.mapped_bytes == 0 and st_.pending_jobs == 0
            assert not any(st_.draining) and not any(self.store.capacity())
        finally:
            self.store.close()


KVStoreMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50,
                                            deadline=None)
TestKVStoreMachine = KVStoreMachine.TestCase
