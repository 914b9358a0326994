"""Session affinity across Ray Serve replicas: multi-turn conversations through 2 engine
replicas, routed to the replica that holds their KV (``--routing affinity``, the default) or by
Ray's power-of-two choices (``random``: no key).

    python -m bench.affinity --json out.json [--model smollm2-135m] [--conversations 8]
                             [--slots S]

A local Ray cluster on this machine; C conversations of 8 turns (bench.workload.conversations),
each turn of every conversation sent at once through the openai client (streamed, greedy
answers of ANSWER_TOKENS tokens, EOS ignored), then the next turn with the answers in the
history. Per turn: TTFT (request sent to first token, client side) and the prompt tokens the
engine prefilled (usage: prompt_tokens - prompt_tokens_details.cached_tokens). Both routings
run the same conversations; the table compares turns 2-8. --slots: each replica's
max_num_seqs (default 2 x conversations: every conversation's KV fits on both replicas; fewer
slots than conversations make random routing, which keeps a conversation's KV on both
replicas, evict).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time

from bench import workload

ANSWER_TOKENS = 32
TURNS = 8
PORT = 18431


async def _turn(client, model: str, history: list[dict]) -> tuple[str, float, int, int]:
    """(answer, TTFT s, prompt tokens, cached tokens) of one streamed chat turn."""
    t0 = time.perf_counter()
    ttft, text, usage = None, "", None
    stream = await client.chat.completions.create(
        model=model, messages=history, max_tokens=ANSWER_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - t0
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    return text, ttft, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens


async def _conversations(model: str, convs: list[list[str]]) -> list[list[tuple]]:
    """Every conversation's turns, turn by turn; [conversation][turn] -> (ttft, prompt,
    cached)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="none",
                                max_retries=0, timeout=600)
    histories = [[] for _ in convs]
    out = [[] for _ in convs]
    for t in range(TURNS):
        for c, conv in enumerate(convs):
            histories[c].append({"role": "user", "content": conv[t]})
        results = await asyncio.gather(*(_turn(client, model, h) for h in histories))
        for c, (text, ttft, prompt, cached) in enumerate(results):
            histories[c].append({"role": "assistant", "content": text})
            out[c].append((ttft, prompt, cached))
    await client.close()
    return out


def measure(model: str, conversations: int, slots: int) -> dict:
    import ray
    from ray import serve

    from jvt.server import ray_serve

    opts = {"max_num_seqs": slots, "max_model_len": 4096}
    *convs, warm = workload.conversations(conversations + 1, turns=TURNS, seed=0,
                                          turn_mean=60, max_turn=160)
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    results = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        for routing in ("affinity", "random"):
            app = ray_serve.build_app(model, opts, replicas=2, max_queue=8, routing=routing,
                                      app_options={"served_names": [model], "root": model})
            serve.run(app, name=ray_serve.APP_NAME, route_prefix="/")
            asyncio.run(_conversations(model, [warm]))  # warm-up
            t0 = time.perf_counter()
            per = asyncio.run(_conversations(model, convs))
            results[routing] = {"wall_s": time.perf_counter() - t0, "turns": per}
            serve.delete(ray_serve.APP_NAME)
        serve.shutdown()
    finally:
        ray.shutdown()
    return results


def summary(results: dict) -> dict:
    """Per routing: mean TTFT and prefilled tokens of each turn, and over turns 2-8."""
    out = {}
    for routing, r in results.items():
        turns = r["turns"]
        prefilled = [[p - c for _, p, c in conv] for conv in turns]
        ttft = [[x for x, _, _ in conv] for conv in turns]
        n = len(turns)
        out[routing] = {
            "wall_s": r["wall_s"],
            "prefilled_per_turn": [sum(p[t] for p in prefilled) / n for t in range(TURNS)],
            "ttft_ms_per_turn": [1e3 * statistics.mean(x[t] for x in ttft)
                                 for t in range(TURNS)],
            "prompt_per_turn": [sum(conv[t][1] for conv in turns) / n for t in range(TURNS)],
            "prefilled_later": sum(sum(p[1:]) for p in prefilled),
            "ttft_ms_later": 1e3 * statistics.mean(x for conv in ttft for x in conv[1:]),
        }
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.affinity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--slots", type=int, default=None)
    args = ap.parse_args(argv)
    slots = args.slots or 2 * args.conversations
    results = measure(args.model, args.conversations, slots)
    s = summary(results)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "model": args.model,
            "conversations": args.conversations, "slots_per_replica": slots, "turns": TURNS,
            "answer_tokens": ANSWER_TOKENS, "python": platform.python_version(),
            "cores": os.cpu_count()}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "summary": s, "raw": results}, f, indent=1)
    print(meta)
    a, r = s["affinity"], s["random"]
    print("| turn | prompt tokens | prefilled: affinity | prefilled: random | TTFT ms: affinity "
          "| TTFT ms: random |\n|---|---|---|---|---|---|")
    for t in range(TURNS):
        print(f"| {t + 1} | {a['prompt_per_turn'][t]:.0f} | {a['prefilled_per_turn'][t]:.0f} | "
              f"{r['prefilled_per_turn'][t]:.0f} | {a['ttft_ms_per_turn'][t]:.0f} | "
              f"{r['ttft_ms_per_turn'][t]:.0f} |")
    print(f"\nturns 2-{TURNS}: prefilled tokens affinity {a['prefilled_later']}, random "
          f"{r['prefilled_later']} ({r['prefilled_later'] / max(1, a['prefilled_later']):.1f}x "
          f"fewer with affinity); mean TTFT {a['ttft_ms_later']:.0f} vs "
          f"{r['ttft_ms_later']:.0f} ms; wall {a['wall_s']:.1f} vs {r['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
