"""A real ``python -m jvt serve`` process for tests (vLLM's RemoteOpenAIServer) and SSE helpers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

TIMEOUT = httpx.Timeout(60.0, connect=5.0)  # every client call in the tests is bounded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    """Starts the server on a free 127.0.0.1 port and waits for /health (or raises with its
    log). ``stop()`` terminates it; ``log()`` is everything it printed."""

    def __init__(self, args: list[str], api_key: str | None = None, startup_s: float = 240.0,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives as long as the server
        cmd = [sys.executable, "-m", "jvt", "serve", "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        # The CPU unless `env` (the whole environment of the process) says otherwise.
        env = env if env is not None else {**os.environ, "JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not healthy after {startup_s} s:\n{self.log()}")
            time.sleep(0.25)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=TIMEOUT)

    def openai(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none",
                             max_retries=0, timeout=60.0)

    def async_openai(self):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none",
                                  max_retries=0, timeout=60.0)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()


def sse_events(response: httpx.Response) -> list:
    """The JSON payloads of a server-sent event stream, then the string "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0.0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        sample, _, label_text = series.partition("{")
        if sample != name:
            continue
        got = dict(p.split("=", 1) for p in label_text.rstrip("}").split(",") if p)
        if all(got.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(value)
    return 0.0
