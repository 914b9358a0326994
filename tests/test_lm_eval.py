"""A real client of prompt logprobs: EleutherAI's lm-evaluation-harness, `local-completions`
against a live `jvt serve`, on the task files in tests/lm_eval (multiple choice scored by
loglikelihood: echo + logprobs + max_tokens; and a greedy generate_until task), gives the same
accuracy, per-choice loglikelihoods (1e-3) and generations as its own `hf` backend running
transformers on the same dense float32 weights."""

from __future__ import annotations

import os
import pathlib

import pytest

from tests.server_utils import RemoteServer

lm_eval = pytest.importorskip("lm_eval")

ROOT = pathlib.Path(__file__).resolve().parent.parent
TASKS = ["jvt_mc", "jvt_gen"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from hf_fixtures import build_hf_model, save_hf_model

    path = tmp_path_factory.mktemp("lm_eval_hf")
    save_hf_model(build_hf_model("llama3", seed=5), path)
    return path


def evaluate(model: str, model_args: dict) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=TASKS, log_samples=True,
        task_manager=TaskManager(include_path=str(ROOT / "tests" / "lm_eval")),
        batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0)


def test_lm_eval_local_completions_equals_hf(checkpoint, monkeypatch):
    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    server = RemoteServer(["--model", str(checkpoint), "--served-model-name", "fixture",
                           "--max-model-len", "256", "--max-num-seqs", "4",
                           "--max-num-batched-tokens", "64", "--token-buckets", "16,64",
                           "--seq-buckets", "4"],
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        served = evaluate("local-completions", {
            "base_url": f"{server.url}/v1/completions", "model": "fixture",
            "tokenizer": str(checkpoint), "tokenizer_backend": "huggingface",
            "tokenized_requests": True, "num_concurrent": 2, "max_retries": 1,
            "max_length": 256, "add_bos_token": True})
    finally:
        assert server.stop() == 0
    ref = evaluate("hf", {"pretrained": str(checkpoint), "dtype": "float32", "device": "cpu",
                          "max_length": 256, "add_bos_token": True})

    mc, gen = served["samples"]["jvt_mc"], served["samples"]["jvt_gen"]
    ref_mc, ref_gen = ref["samples"]["jvt_mc"], ref["samples"]["jvt_gen"]
    assert len(mc) == len(ref_mc) == 24 and len(gen) == len(ref_gen) == 10
    by_doc = {s["doc_id"]: s for s in ref_mc}
    for s in mc:
        r = by_doc[s["doc_id"]]
        got = [resp[0][0] for resp in s["resps"]]  # (loglikelihood, is_greedy) per choice
        want = [resp[0][0] for resp in r["resps"]]
        assert len(got) == len(s["doc"]["choices"]) >= 2
        assert got == pytest.approx(want, abs=1e-3), s["doc"]
        assert all(v < 0 for v in got)
        assert [resp[0][1] for resp in s["resps"]] == [resp[0][1] for resp in r["resps"]]
        assert s["acc"] == r["acc"]
    accs = {s["acc"] for s in mc}
    assert accs == {0.0, 1.0}  # the random model gets some right and some wrong
    by_doc = {s["doc_id"]: s for s in ref_gen}
    for s in gen:
        assert s["resps"] == by_doc[s["doc_id"]]["resps"], s["doc"]
    assert any(s["resps"][0][0] for s in gen)  # something was generated
    for task, metric in (("jvt_mc", "acc,none"), ("jvt_gen", "exact_match,none")):
        assert served["results"][task][metric] == ref["results"][task][metric]
