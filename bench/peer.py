"""The CPU peer: ik_llama.cpp (PyPI wheel ``ik-llama-cpp-python``) on a GGUF file, driven
through the wheel's low-level calls (llama_decode on batches, the logits read with NumPy and
argmax'd there; its high-level ``generate`` scans the vocabulary in Python per token).

    peer = Peer(path, threads=2, seqs=8)
    first = peer.prefill(prompt, seq=0)            # the greedy first token
    nxt = peer.step([t0, t1], [pos0, pos1])        # one token per sequence 0..n-1
"""

from __future__ import annotations

import ctypes

import numpy as np


class Peer:
    """One ik_llama.cpp context of ``seqs`` sequences of up to ``n_ctx`` tokens in total."""

    def __init__(self, path: str, *, threads: int = 2, seqs: int = 8, n_ctx: int = 4096,
                 flash_attn: bool = False):
        from ik_llama_cpp import _ctypes_api as C
        from ik_llama_cpp._internals import IkContext, IkModel

        self.C = C
        self.model = IkModel(path)
        self.context = IkContext(self.model, n_ctx=n_ctx, n_threads=threads, n_seq_max=seqs,
                                 flash_attn=flash_attn)
        self.vocab = self.model.n_vocab
        self.ubatch = self.context._n_ubatch

    def clear(self) -> None:
        self.C.llama_kv_cache_clear(self.context.ctx)

    def _decode(self, tokens: list[int], positions: list[int], seqs: list[int],
                logits: list[bool]) -> None:
        C = self.C
        batch = C.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, (tok, pos, seq, out) in enumerate(zip(tokens, positions, seqs, logits)):
                batch.token[i], batch.pos[i] = tok, pos
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
                batch.logits[i] = 1 if out else 0
            ret = C.llama_decode(self.context.ctx, batch)
        finally:
            C.llama_batch_free(batch)
        if ret != 0:
            raise RuntimeError(f"llama_decode returned {ret}")

    def _argmax(self, index: int) -> int:
        ptr = self.C.llama_get_logits_ith(self.context.ctx, index)
        row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                    (self.vocab,))
        return int(row.argmax())

    def prefill(self, prompt: list[int], seq: int = 0) -> int:
        """Run ``prompt`` (positions from 0) for sequence ``seq`` in ubatch-sized decode
        calls; the greedy next token."""
        for start in range(0, len(prompt), self.ubatch):
            chunk = prompt[start:start + self.ubatch]
            last = start + len(chunk) == len(prompt)
            self._decode(chunk, list(range(start, start + len(chunk))), [seq] * len(chunk),
                         [last and i == len(chunk) - 1 for i in range(len(chunk))])
        return self._argmax(-1)

    def step(self, tokens: list[int], positions: list[int]) -> list[int]:
        """One decode step of sequences 0 .. len(tokens) - 1 (token i at positions[i]); the
        greedy next token of each."""
        self._decode(tokens, positions, list(range(len(tokens))), [True] * len(tokens))
        return [self._argmax(i) for i in range(len(tokens))]
