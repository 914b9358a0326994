"""The engine process's transport, measured: multiprocessing pipes (pickle) against ZMQ IPC
sockets with msgspec (msgpack) encoding, on the messages `jvt serve` sends.

One per-step output message of S rows (each: submission id, choice index, one new token id,
no logprobs, no finish, three metric numbers) goes from a child process to the parent; and
the reverse, one "add" command with a P-token prompt. Reported per message: the ping-pong
round trip (latency; the parent's and child's encode, send, wake-up, receive, decode) and the
parent's CPU time per received message in a one-way stream (what the API process pays, in
its GIL, for every engine step).

    python -m bench.transport [--rows 32] [--prompt 512] [--count 20000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import pathlib
import statistics
import time

import msgspec
import zmq


def step_message(rows: int) -> list:
    return ["out", [[7, i % 4, [1234 + i], None, None, None, [1.5, 0, 0]] for i in range(rows)],
            None]


def add_message(prompt: int) -> list:
    return ["add", 7, [[list(range(prompt)), {"temperature": 0.7, "max_tokens": 128}]]]


def _pipe_child(conn, kind: str, count: int, msg) -> None:
    if kind == "pingpong":
        for _ in range(count):
            conn.send(conn.recv())
    else:
        for _ in range(count):
            conn.send(msg)
        conn.recv()


def _zmq_child(addr_in: str, addr_out: str, kind: str, count: int, msg) -> None:
    ctx = zmq.Context()
    rx, tx = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    rx.connect(addr_in)
    tx.connect(addr_out)
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    if kind == "pingpong":
        for _ in range(count):
            tx.send(enc.encode(dec.decode(rx.recv())))
    else:
        for _ in range(count):
            tx.send(enc.encode(msg))
        rx.recv()
    ctx.destroy(linger=1000)


def run_pipe(kind: str, count: int, msg) -> tuple[float, float]:
    """(seconds per message wall, parent CPU seconds per message)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_pipe_child, args=(child, kind, count, msg))
    proc.start()
    if kind == "pingpong":
        parent.send(msg)  # warm the child
        proc_count = count - 1
        parent.recv()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(proc_count):
            parent.send(msg)
            parent.recv()
    else:
        parent.recv()
        proc_count = count - 1
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(proc_count):
            parent.recv()
        parent.send("done")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    proc.join()
    return wall / proc_count, cpu / proc_count


def run_zmq(kind: str, count: int, msg, tmp: pathlib.Path) -> tuple[float, float]:
    ctx = zmq.Context()
    tx, rx = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    addr_in, addr_out = f"ipc://{tmp}/in", f"ipc://{tmp}/out"
    tx.bind(addr_in)
    rx.bind(addr_out)
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    proc = mp.get_context("spawn").Process(target=_zmq_child,
                                           args=(addr_in, addr_out, kind, count, msg))
    proc.start()
    if kind == "pingpong":
        tx.send(enc.encode(msg))
        dec.decode(rx.recv())
        proc_count = count - 1
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(proc_count):
            tx.send(enc.encode(msg))
            dec.decode(rx.recv())
    else:
        dec.decode(rx.recv())
        proc_count = count - 1
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(proc_count):
            dec.decode(rx.recv())
        tx.send(b"done")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    proc.join()
    ctx.destroy(linger=0)
    return wall / proc_count, cpu / proc_count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="bench/results/transport.json")
    args = ap.parse_args()
    import tempfile

    rows = []
    for label, msg in ((f"step output, {args.rows} rows", step_message(args.rows)),
                       (f"add, {args.prompt}-token prompt", add_message(args.prompt))):
        for kind in ("pingpong", "stream"):
            for name in ("pipe+pickle", "zmq+msgspec"):
                runs = []
                for _ in range(args.repeats):
                    if name == "pipe+pickle":
                        runs.append(run_pipe(kind, args.count, msg))
                    else:
                        with tempfile.TemporaryDirectory() as tmp:
                            runs.append(run_zmq(kind, args.count, msg, pathlib.Path(tmp)))
                wall = statistics.median(r[0] for r in runs)
                cpu = statistics.median(r[1] for r in runs)
                rows.append({"message": label, "pattern": kind, "transport": name,
                             "us_per_msg": wall * 1e6, "parent_cpu_us_per_msg": cpu * 1e6})
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    print(f"{'message':<28} {'pattern':<9} {'transport':<12} {'us/msg':>8} {'parent CPU us':>14}")
    for r in rows:
        print(f"{r['message']:<28} {r['pattern']:<9} {r['transport']:<12} "
              f"{r['us_per_msg']:>8.1f} {r['parent_cpu_us_per_msg']:>14.1f}")


if __name__ == "__main__":
    main()
