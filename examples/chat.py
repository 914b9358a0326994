"""Interactive multi-turn chat with streaming output on jvt.

    python examples/chat.py                      # the `tiny` preset on the CPU
    python examples/chat.py --model /path/to/hf-checkpoint --device cuda
    printf 'hello\\nand again\\n' | python examples/chat.py   # piped input works too

The presets have RANDOM WEIGHTS: their replies are gibberish. They exist so the whole engine
runs without any download; pass --model with a local Hugging Face checkpoint for real text.
Each turn keeps the conversation's KV cache in its slot, so only the new message is prefilled;
after every reply the script prints the time to first token and the decode rate
(the loop itself is jvt/chat.py, shared with `python -m jvt chat`).
Ctrl-D or Ctrl-C exits.
"""

from __future__ import annotations

import argparse
import sys

import jvt
import jvt.models
from jvt.chat import repl


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="preset name or checkpoint directory")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default=None,
                    help="bfloat16, float16 or float32 (default: the model's; bfloat16 on CUDA)")
    ap.add_argument("--system", default=None, help="system message")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    args = ap.parse_args()

    if args.model in jvt.models.PRESETS:
        print(f"[{args.model} preset: random weights, so the replies are gibberish]")
    dtype = args.dtype or (None if args.device == "cpu" else "bfloat16")
    model = jvt.models.load(args.model, dtype=dtype)
    # A few step shapes keep start-up (their compilation) short.
    engine = jvt.Engine(model, device=args.device, max_num_seqs=4,
                        max_model_len=min(4096, model.config.max_position_embeddings),
                        max_num_batched_tokens=256, token_buckets=(16, 64, 256),
                        seq_buckets=(1, 4))
    params = jvt.SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                max_tokens=args.max_tokens)
    with engine.session(args.system) as session:
        repl(session, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
