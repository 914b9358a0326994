"""Tensor parallelism across processes (jvt.distributed): 2 processes x 1 CPU device with
tensor_parallel=2 over gloo give the tokens of one process, each holding half the KV."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from server_utils import free_port

WORKER = """
import json, sys
from jvt import distributed
if sys.argv[1] != "single":
    distributed.initialize(sys.argv[2], 2, int(sys.argv[1]))
import jvt
engine = jvt.Engine("tiny", tensor_parallel=1 if sys.argv[1] == "single" else 2,
                    max_num_seqs=4, max_model_len=512, token_buckets=(16, 64),
                    seq_buckets=(1, 4), max_num_batched_tokens=64, decode_steps=4)
params = [jvt.SamplingParams(temperature=0, max_tokens=23, ignore_eos=True),
          jvt.SamplingParams(temperature=0.9, seed=5, max_tokens=17, ignore_eos=True)]
outs = engine.generate(["Once upon a time", "ab", "xyz " * 30], [params[0], params[1], params[0]],
                       use_tqdm=False)
with engine.session() as s:
    turns = [s.send(m, params[0]).token_ids for m in ("hello", "and more")]
stats = engine.stats()
print("RESULT " + json.dumps({"tokens": [o.token_ids for o in outs], "turns": turns,
                              "devices": len(stats["kv_per_device"]),
                              "token_bytes": engine.store.token_bytes}))
engine.close()
"""
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_two_processes_equal_one():
    address = f"127.0.0.1:{free_port()}"
    procs = [start(str(i), address) for i in range(2)]
    got = [result(p) for p in procs]
    single = result(start("single"))
    for g in got:
        assert g["tokens"] == single["tokens"]
        assert g["turns"] == single["turns"]
        assert g["devices"] == 1  # this process's store only
        assert 2 * g["token_bytes"] == single["token_bytes"]  # half the KV heads


def test_generate_command_across_two_processes():
    address = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "jvt", "generate", "--model", "tiny", "--prompt", "Hello",
           "--prompt", "a b c", "--temperature", "0", "--max-tokens", "12",
           "--tensor-parallel", "2", "--coordinator", address, "--num-processes", "2"]
    procs = [subprocess.Popen([*cmd, "--process-id", str(i)], env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    single = subprocess.run([*cmd[:cmd.index("--tensor-parallel")]], env=ENV, text=True,
                            capture_output=True, timeout=600, check=True).stdout
    assert _untimed(outs[0]) == _untimed(single) and "--- 'Hello'" in outs[0]
    assert _untimed(outs[1]) == []


def _untimed(text: str) -> list[str]:
    """The command's output without the TTFT of each prompt's heading and gloo's own line."""
    return [x.split(", ttft")[0] if x.startswith("---") else x for x in text.splitlines()
            if not x.startswith("[Gloo]")]


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:1"], "go together"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "host:port"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "process_id"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "0", "--process-id", "0"],
     "num_processes")])
def test_bad_distributed_flags(flags, message):
    r = subprocess.run([sys.executable, "-m", "jvt", "generate", "--model", "tiny", "--prompt",
                        "x", *flags], env=ENV, text=True, capture_output=True, timeout=120,
                       check=False)
    assert r.returncode == 2 and message in r.stderr, r.stderr
