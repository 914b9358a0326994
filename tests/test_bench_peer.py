"""bench/peer.py (the CPU peer, ik_llama.cpp through its decode calls) against the peer's own
high-level greedy generate, alone and with sequences batched."""

import pytest

from bench.peer import Peer
from jvt.models import locate_real_model

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def path():
    return locate_real_model("smollm2-135m")


def test_greedy_tokens_equal_the_peers_own_generate(path):
    from ik_llama_cpp.llama import IkLlama

    llm = IkLlama(path, n_ctx=256, n_threads=2, verbose=False)
    ids = llm.tokenize(PROMPT, add_bos=False, special=True)
    ref = llm.generate(ids, max_tokens=12)  # stops at the end of turn
    llm.close()
    assert len(ref) >= 3
    peer = Peer(path, threads=2, seqs=3, n_ctx=512)
    out = [peer.prefill(ids)]
    while len(out) < len(ref):
        out += peer.step([out[-1]], [len(ids) + len(out) - 1])
    assert out == ref
    # Three sequences of different prompts stepped together give each one's tokens alone.
    prompts = [ids, ids[:-4] + ids[-3:], ids[3:]]
    alone = []
    for p in prompts:
        peer.clear()
        toks = [peer.prefill(p)]
        for i in range(5):
            toks += peer.step([toks[-1]], [len(p) + i])
        alone.append(toks)
    peer.clear()
    together = [[peer.prefill(p, seq)] for seq, p in enumerate(prompts)]
    for i in range(5):
        nxt = peer.step([t[-1] for t in together], [len(p) + i for p in prompts])
        for t, n in zip(together, nxt):
            t.append(n)
    assert together == alone
