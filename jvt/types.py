"""Types that cross module boundaries (engine <-> runner <-> model <-> FFI op).

Every array field carries a shape comment. T is the packed token count of a step (a bucket
size), S the number of sequence entries of a step (a bucket size).
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttnMeta:
    """Per-step attention metadata: a packed ragged batch of decode tokens and prefill chunks.

    Sequence i owns rows [seq_start[i], seq_start[i+1]) of the step's tokens; its n_i new
    tokens take positions [seq_len[i] - n_i, seq_len[i]) in slot seq_slot[i], and each attends
    causally to positions [0, its own position]. Rows >= seq_start[S] are padding: nothing is
    written for them and their attention output is zero. Entries with an empty row range are
    ignored (their seq_slot may be -1).
    """

    positions: jax.Array  # [T] int32 position of each row (RoPE); 0 for padding rows
    seq_start: jax.Array  # [S+1] int32 non-decreasing, seq_start[0] == 0, seq_start[S] <= T
    seq_slot: jax.Array  # [S] int32 KV-store slot of each sequence, -1 when unused
    seq_len: jax.Array  # [S] int32 KV length of each sequence after this step
