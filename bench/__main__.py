"""`python -m bench --out DIR [--smoke] [--only a,b]`: see bench/run.py."""

import os

# Before JAX initialises: XLA's pool gets 45% of the GPU; the rest is for jvt's KV pool (its
# own VMM allocations) and for torch (the HF baseline and the torch SDPA kernels).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

from bench.run import main

if __name__ == "__main__":
    main()
