"""`jvt serve` with its engine in a process of its own (the default): the layout, what a crash
or a signal of either process does, and the gauges after disconnects. Each test starts its
own server on the tiny preset."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time

import httpx
import pytest

from tests.server_utils import TIMEOUT, RemoteServer, metric, sse_events

SERVER_ARGS = ["--model", "tiny", "--max-num-seqs", "16", "--max-model-len", "4096",
               "--max-num-batched-tokens", "64", "--token-buckets", "16,64",
               "--seq-buckets", "4,16"]
LONG = {"prompt": "hello", "max_tokens": 3000, "temperature": 0.8, "ignore_eos": True}


def engine_pid(server: RemoteServer) -> int:
    found = re.search(r"engine process pid (\d+)", server.log())
    assert found, server.log()
    return int(found.group(1))


def ppid(pid: int) -> int | None:
    """The parent pid of a live process, None when it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except FileNotFoundError:
        return None
    return None if fields[0] == "Z" else int(fields[1])


def children(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and ppid(int(p)) == pid]


def thread_names(pid: int) -> set[str]:
    names = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            names.add(f.read().strip())
    return names


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ppid(pid) is None:
            return True
        time.sleep(0.05)
    return False


def wait_exit(server: RemoteServer, seconds: float) -> int | None:
    try:
        return server.proc.wait(seconds)
    except Exception:  # noqa: BLE001 - still running: the caller asserts
        return None


def start_streams(server: RemoteServer, count: int, body: dict) -> tuple[list, list]:
    """``count`` streamed completions on threads; (their event lists, the threads). Each list
    gets its events when its stream ends (or the exception that ended it)."""
    results: list = [None] * count
    started = threading.Barrier(count + 1, timeout=60)

    def one(i: int) -> None:
        try:
            with httpx.Client(timeout=TIMEOUT) as c, c.stream(
                    "POST", f"{server.url}/v1/completions", json={**body, "stream": True}) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line)
                started.wait()
                results[i] = [first, *(line for line in lines if line)]
        except Exception as e:  # noqa: BLE001 - the test looks at it
            results[i] = e
            started.abort()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    started.wait()
    return results, threads


@pytest.fixture
def server():
    s = RemoteServer(SERVER_ARGS)
    yield s
    s.stop()


def test_engine_runs_in_its_own_process(server):
    pid = engine_pid(server)
    assert pid != server.proc.pid and ppid(pid) == server.proc.pid
    with server.http() as c:
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    # XLA's CPU client starts its Eigen thread pool when a backend is initialised: the engine
    # process has one, the API process none.
    assert "tf_XLAEigen" in thread_names(pid)
    assert "tf_XLAEigen" not in thread_names(server.proc.pid)


def test_bad_request_never_reaches_the_engine(server):
    with server.http() as c:
        received = c.get("/engine/stats").json()["requests_received"]
        bad = [{"prompt": "hi", "max_tokens": -1}, {"prompt": "hi", "top_p": 2},
               {"prompt": "hi", "frobnicate": 1}, {"prompt": [1, 2**40]},
               {"prompt": "hi", "presence_penalty": 2.5},
               {"prompt": "hi", "max_tokens": 2, "min_tokens": 3},
               {"prompt": "hi", "logit_bias": {"x": 1}}]
        for body in bad:
            assert c.post("/v1/completions", json=body).status_code == 400, body
        assert c.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        assert c.get("/engine/stats").json()["requests_received"] == received
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                               "n": 3}).status_code == 200
        assert c.get("/engine/stats").json()["requests_received"] == received + 3


def test_kill_engine_mid_stream(server):
    pid = engine_pid(server)
    kids = children(server.proc.pid)  # the engine (and multiprocessing's resource tracker)
    assert pid in kids
    results, threads = start_streams(server, 4, LONG)
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(30)
    for events in results:
        assert isinstance(events, list), events
        assert events[-1] == "data: [DONE]", events[-3:]
        assert '"error"' in events[-2] and "engine process exited" in events[-2], events[-2]
    with server.http() as c:  # the server answers for DEATH_EXIT_S more, then exits
        assert c.get("/health").status_code == 503
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
    code = wait_exit(server, 10)
    assert code not in (None, 0), server.log()[-3000:]
    assert all(wait_gone(k, 5) for k in kids)
    assert "engine process died" in server.log()


def test_sigterm_during_16_streams(server):
    kids = children(server.proc.pid)
    assert engine_pid(server) in kids
    results, threads = start_streams(server, 16, LONG)
    server.signal(signal.SIGTERM)
    assert wait_exit(server, 30) == 0, server.log()[-3000:]
    for t in threads:
        t.join(30)
    assert all(wait_gone(k, 5) for k in kids)
    for events in results:
        assert isinstance(events, list), events  # each stream ended cleanly
        assert events[-1] == "data: [DONE]" and '"finish_reason":"abort"' in events[-2]


def test_kill_api_process_engine_exits(server):
    kids = children(server.proc.pid)
    assert engine_pid(server) in kids
    start_streams(server, 2, LONG)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    assert all(wait_gone(k, 5) for k in kids), "a child outlived the API process by 5 s"


def test_disconnects_leave_gauges_at_zero(server):
    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as c:
            async def one(i: int) -> None:
                body = {"prompt": f"q{i}", "max_tokens": 200 if i % 4 == 0 else 24,
                        "temperature": 0.5, "ignore_eos": True, "stream": True}
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    count = 0
                    async for line in r.aiter_lines():
                        count += bool(line)
                        if i % 4 == 0 and count == 3:
                            return  # a quarter of the clients leave mid-stream
                    assert line == "" and count >= 2
            await asyncio.gather(*(one(i) for i in range(64)))

    asyncio.run(asyncio.wait_for(scenario(), 300))
    deadline = time.monotonic() + 10
    with server.http() as c:
        while True:
            text = c.get("/metrics").text
            values = [metric(text, name) for name in
                      ("jvt:num_requests_running", "jvt:num_requests_waiting",
                       "jvt:num_requests_unfinished")]
            if values == [0, 0, 0] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert values == [0, 0, 0], text
        stats = c.get("/engine/stats").json()
        assert stats["running"] == 0 and stats["waiting"] == 0
        assert metric(text, "jvt:request_success_total", finished_reason="abort") >= 1
        assert metric(text, "jvt:request_success_total", finished_reason="length") >= 48


def test_in_process_engine_flag():
    s = RemoteServer([*SERVER_ARGS, "--engine-in-process"])
    try:
        assert "engine ready" in s.log() and "in this process" in s.log()
        assert children(s.proc.pid) == []
        with s.http() as c:
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True})
            assert sse_events(r)[-1] == "[DONE]"
    finally:
        assert s.stop() == 0


def test_outputs_equal_the_in_process_engine(server):
    """The API process detokenizes and applies stop strings; outputs (text, token counts, stop
    trimming, streamed pieces, logprobs) equal an in-process Engine with the same options."""
    import jvt

    opts = {"max_num_seqs": 16, "max_model_len": 4096, "max_num_batched_tokens": 64,
            "token_buckets": (16, 64), "seq_buckets": (4, 16)}
    engine = jvt.Engine("tiny", **opts)
    try:
        with server.http() as c:
            for prompt in ("Once upon a time", "ab", "Stop strings: "):
                plain = jvt.SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                           logprobs=2)
                ref = engine.generate(prompt, plain, use_tqdm=False)[0]
                stop = ref.text[7:10]
                stopped = engine.generate(prompt, jvt.SamplingParams(
                    temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]),
                    use_tqdm=False)[0]
                body = {"prompt": prompt, "max_tokens": 40, "temperature": 0,
                        "ignore_eos": True}
                r = c.post("/v1/completions", json={**body, "logprobs": 2}).json()
                choice = r["choices"][0]
                assert choice["text"] == ref.text
                assert r["usage"]["completion_tokens"] == len(ref.token_ids)
                assert choice["logprobs"]["token_logprobs"] == pytest.approx(
                    [lp.logprob for lp in ref.logprobs], abs=1e-5)
                r = c.post("/v1/completions", json={**body, "stop": stop}).json()
                assert r["choices"][0]["text"] == stopped.text == ref.text[:ref.text.find(stop)]
                assert r["choices"][0]["finish_reason"] == "stop"
                assert r["usage"]["completion_tokens"] == len(stopped.token_ids)
                events = sse_events(c.post("/v1/completions",
                                           json={**body, "stop": stop, "stream": True}))
                assert "".join(e["choices"][0]["text"] for e in events[:-1]) == stopped.text
            # penalties, biases, min_tokens and prompt logprobs cross the process boundary
            penalised = {"frequency_penalty": 0.7, "presence_penalty": 0.3,
                         "repetition_penalty": 1.4, "logit_bias": {ref.token_ids[1]: -100,
                                                                   ord("e"): 3.5}}
            ref = engine.generate("Once upon", jvt.SamplingParams(
                temperature=0.0, max_tokens=30, min_tokens=20, prompt_logprobs=2, logprobs=0,
                **penalised), use_tqdm=False)[0]
            bias = {str(t): v for t, v in penalised["logit_bias"].items()}
            r = c.post("/v1/completions", json={
                "prompt": "Once upon", "max_tokens": 30, "temperature": 0, "min_tokens": 20,
                "prompt_logprobs": 2, "logprobs": 0, **penalised, "logit_bias": bias}).json()
            choice = r["choices"][0]
            assert choice["text"] == ref.text and r["usage"]["completion_tokens"] == len(
                ref.token_ids) >= 20
            assert choice["logprobs"]["token_logprobs"] == pytest.approx(
                [lp.logprob for lp in ref.logprobs], abs=1e-5)
            for got, want in zip(choice["prompt_logprobs"][1:], ref.prompt_logprobs[1:]):
                assert got[str(want.token_id)]["logprob"] == pytest.approx(want.logprob,
                                                                           abs=1e-5)
                assert got[str(want.token_id)]["rank"] == want.rank
                assert {int(t) for t in got} == {want.token_id, *want.top}
    finally:
        engine.close()
