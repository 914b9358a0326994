"""Runner: turns a StepPlan into bucket-shaped device arrays and runs the compiled step.

The model's NNX module is split once into its graphdef (static: structure, config, layer
indices) and its weights, flattened once into a list of arrays; the jitted step is a plain
function of that list that merges the module back inside the trace. So a step's dispatch
flattens a list, never NNX Variables (nnx.jit or passing the Module to jax.jit costs 5-150x
the host time per call). Weights are never donated.

Every step shape (T, S) of EngineConfig.step_shapes is compiled ahead of time by ``warmup()``:
on a GPU twice, greedy-only and sampling (a static switch, see jvt.sampling.sample), on the
CPU once (the step picks greedy or sampling on the device). A step pads its plan to the
smallest shape that holds it (pure decode: T = S, one row per sequence), so sequences growing
never recompile anything (the KV cache lives outside XLA). The step keeps the last sampled token of every slot on the device
(``last_tokens`` [slots]); a decode row of step N takes its input from there, so step N can be
enqueued before the host has read step N-1's tokens (one-step lag). The penalty tables
(jvt.penalties) are threaded through the steps the same way.

A pure-decode step whose entries may run more than one iteration (StepPlan.steps > 1, see
Scheduler.decode_steps) runs the K-step variant of its shape (compiled by ``warmup`` for the
decode shapes): a ``lax.while_loop`` of up to K iterations of the same step body, each taking
its input tokens from ``last_tokens`` as written by the previous one, with a done mask per row
(the EOS and stop token ids, the row's iteration limit): a row that finished is masked out of
the next iterations (its sequence's slot becomes MASKED_SLOT, so the attention op writes no KV
for it and its sample is not kept), and the loop ends early when every row is done. One
[K, S, 2 + 2K'] transfer brings the tokens and logprobs of every iteration back. A call with
structured-output rows runs the masked K-step variant (compiled when first needed): the
allowed tokens apply to its first iteration, whose inputs the host has read back; the later
iterations' draws are checked by the host (see jvt.sampling.sample).

A step that holds prompt rows of a request asking for prompt_logprobs runs the scoring variant
of its shape (compiled when first needed): the LM head over every row, in blocks of at most
SCORE_BLOCK rows so no full-vocabulary logits of a long chunk are held at once, reduced to each
row's log-probability and rank of the next prompt token and the top alternatives.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jvt import parallel, penalties
from jvt.config import bucket
from jvt.penalties import PenaltyTables
from jvt.sampling import SampleResult, SamplingArrays, sample
from jvt.scheduler import Entry, StepPlan
from jvt.types import MAX_LOGPROBS, AttnMeta, SamplingParams

SCORE_BLOCK = 64  # most rows whose full-vocabulary logits one scoring block holds
MASKED_SLOT = -2  # seq_slot of a sequence whose rows the attention op skips (kSlotMasked)
# Token ids per row that end it on the device in a K-step call: EOS ids, then stop_token_ids.
# A row with more is stopped by the host (its extra tokens are discarded, as after a stop
# string), so this bounds wasted work, never what is emitted.
MAX_DEVICE_STOPS = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    """One step's packed rows (T = token bucket, S = sequence bucket)."""

    tokens: jax.Array  # [T] int32 host-known input ids (0 for padding and device-fed rows)
    prev_slot: jax.Array  # [T] int32 slot whose last sampled token is this row's input, or -1
    meta: AttnMeta  # positions [T], seq_start [S+1], seq_slot [S], seq_len [S]
    keep: jax.Array  # [S] bool: entry's sample is kept (stored into last_tokens)
    sampling: SamplingArrays  # [S] per-entry sampling parameters


def _int_fields(i: StepInputs) -> list:
    """The int32 fields of StepInputs in wire order (see _to_wire)."""
    m, sp = i.meta, i.sampling
    return [i.tokens, i.prev_slot, m.positions, m.seq_start, m.seq_slot, m.seq_len, i.keep,
            sp.top_k, sp.seed, sp.counter, sp.min_tokens, sp.penalized]


def _to_wire(i: StepInputs) -> tuple[np.ndarray, np.ndarray]:
    """One int32 and one float32 host array (two transfers per step instead of eighteen)."""
    ints = [np.asarray(a).astype(np.int32) if a.dtype == bool else np.asarray(a).view(np.int32)
            for a in _int_fields(i)]
    sp = i.sampling
    return np.concatenate(ints), np.concatenate([sp.temperature, sp.top_p, sp.min_p,
                                                 sp.presence, sp.frequency, sp.repetition])


def _from_wire(ints: jax.Array, floats: jax.Array, t: int, s: int) -> StepInputs:
    sizes = [t, t, t, s + 1, s, s, s, s, s, s, s, s]
    parts = jnp.split(ints, np.cumsum(sizes)[:-1])
    (tokens, prev_slot, positions, seq_start, seq_slot, seq_len, keep, top_k, seed, counter,
     min_tokens, penalized) = parts
    temperature, top_p, min_p, presence, frequency, repetition = jnp.split(floats, 6)
    sampling = SamplingArrays(temperature, top_k, top_p, min_p,
                              jax.lax.bitcast_convert_type(seed, jnp.uint32), counter,
                              presence, frequency, repetition, min_tokens, penalized.astype(bool))
    meta = AttnMeta(positions, seq_start, seq_slot, seq_len)
    return StepInputs(tokens, prev_slot, meta, keep.astype(bool), sampling)


_as_f32 = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.float32)


def _step(weights, last_tokens, tables, ints, floats, *extra, t, s, greedy_only, penalize,
          scoring, masked, graphdef, treedef, store_id, tensor_parallel, split_vocab):
    """One engine step: returns the new last_tokens and penalty tables, and [S, 2 + 2K]
    float32 results (token id and top ids bit-cast), read back in one transfer. extra: with
    ``scoring``, targets ([T] int32 next prompt token of each row, -1 for none), and the step
    also returns [T, 2 + 2K] scores (``_score``); with ``masked``, masks ([S, ceil(V / 32)]
    int32 allowed-token bits of each entry, jvt.structured). weights: the module's flat state
    (one device's shards under tensor parallelism, where this runs inside shard_map).
    penalize: None decides on the device whether any row is penalised (as greedy_only None)."""
    module, lm_head, reduce = _merged(weights, graphdef, treedef, split_vocab, tensor_parallel)
    inputs = _from_wire(ints, floats, t, s)
    masks = extra[-1] if masked else None
    last_tokens, tables, out, hidden = _forward(module, lm_head, reduce, store_id, last_tokens,
                                                tables, inputs, greedy_only, penalize, masks)
    if not scoring:
        return last_tokens, tables, out
    return last_tokens, tables, out, _score(lm_head, hidden, extra[0])


def _forward(module, lm_head, reduce, store_id, last_tokens, tables, inputs: StepInputs,
             greedy_only, penalize, masks=None):
    """The model over the step's rows, then each entry's sample: (last_tokens, tables,
    [S, 2 + 2K] results, hidden [T, H]). masks: None or the allowed-token bits per entry."""
    prev = last_tokens[jnp.maximum(inputs.prev_slot, 0)]
    tokens = jnp.where(inputs.prev_slot >= 0, prev, inputs.tokens)
    hidden = module(tokens, inputs.meta, store_id=store_id, reduce=reduce)
    last_rows = jnp.maximum(inputs.meta.seq_start[1:] - 1, 0)  # [S] each entry's last row
    logits = lm_head(hidden[last_rows])
    choose = _penalized(logits, tables, inputs, penalize)
    allowed = None
    if masks is not None:
        ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
        allowed = ((masks[:, ids // 32] >> (ids % 32)) & 1) != 0  # [S, V]
    r = sample(logits, inputs.sampling, greedy_only=greedy_only, choose=choose,
               allowed=allowed)
    slots = last_tokens.shape[0]
    target = jnp.where(inputs.keep, inputs.meta.seq_slot, slots)  # out of range: dropped
    last_tokens = last_tokens.at[target].set(r.tokens, mode="drop")
    tables = penalties.count(tables, target, r.tokens)
    out = jnp.concatenate([_as_f32(r.tokens)[:, None], r.logprob[:, None], _as_f32(r.top_ids),
                           r.top_logprobs], axis=1)
    return last_tokens, tables, out, hidden


def _multi_step(weights, last_tokens, tables, ints, floats, stops, *extra, t, s, k, greedy_only,
                penalize, masked, graphdef, treedef, store_id, tensor_parallel, split_vocab):
    """Up to k decode iterations of a pure-decode step (one row per entry): returns
    last_tokens, tables and [k, S, 2 + 2K] results, iteration j in row j (iterations after
    every row is done are left zero). stops: [S, 1 + MAX_DEVICE_STOPS] int32, per entry the
    iterations it may run (0 for padding) and the token ids that end it (-1: none). A token
    ends its row only once the row has min_tokens outputs, as on the host.

    Iteration 0 takes each row's input as a one-step call does (a host token or last_tokens),
    the later ones from last_tokens. With ``masked``, extra holds the [S, ceil(V / 32)]
    allowed-token bits of iteration 0 (a call with structured-output rows): that iteration runs
    outside the loop with them, the others draw unmasked and the host checks their tokens
    (jvt.sampling.sample; the engine discards a refused token and the rest of its row)."""
    module, lm_head, reduce = _merged(weights, graphdef, treedef, split_vocab, tensor_parallel)
    first = _from_wire(ints, floats, t, s)
    limit, stop_ids = stops[:, 0], stops[:, 1:]
    meta, sp = first.meta, first.sampling
    n = min(s, t)  # entry i is row i
    own_slot = jnp.full(t, -1, jnp.int32).at[:n].set(meta.seq_slot[:n])

    def inputs_at(j, done):
        """Iteration j's inputs: one position further per iteration, done rows masked."""
        masked_slot = jnp.where(done & (meta.seq_slot >= 0), MASKED_SLOT, meta.seq_slot)
        prev_slot = jnp.where(j == 0, first.prev_slot, own_slot)
        return StepInputs(first.tokens, prev_slot,
                          AttnMeta(meta.positions + j, meta.seq_start, masked_slot,
                                   meta.seq_len + j),
                          first.keep & ~done,
                          dataclasses.replace(sp, counter=sp.counter + j))

    def run(j, last_tokens, tables, outs, done, masks=None):
        last_tokens, tables, out, _ = _forward(module, lm_head, reduce, store_id, last_tokens,
                                               tables, inputs_at(j, done), greedy_only,
                                               penalize, masks)
        token = jax.lax.bitcast_convert_type(out[:, 0], jnp.int32)
        hit = jnp.any(token[:, None] == stop_ids, axis=1) & (sp.counter + j + 1 >= sp.min_tokens)
        done = done | hit | (j + 1 >= limit)
        return last_tokens, tables, jax.lax.dynamic_update_index_in_dim(outs, out, j, 0), done

    width = 2 + 2 * min(MAX_LOGPROBS, module.config.vocab_size)
    outs = jnp.zeros((k, s, width), jnp.float32)
    carry = (0, last_tokens, tables, outs, limit <= 0)
    if masked:
        carry = (1, *run(*carry, masks=extra[0]))
    _, last_tokens, tables, outs, _ = jax.lax.while_loop(
        lambda c: (c[0] < k) & ~jnp.all(c[4]), lambda c: (c[0] + 1, *run(*c)), carry)
    return last_tokens, tables, outs


def _merged(weights, graphdef, treedef, split_vocab: bool, tensor_parallel: bool):
    """Inside a step's trace: the module from its flat weights, its LM head (gathering a split
    vocabulary) and the all-reduce of its layers (identity without tensor parallelism)."""
    module = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))
    lm_head = functools.partial(_lm_head, module, split_vocab)
    reduce = parallel.all_reduce if tensor_parallel else (lambda x: x)
    return module, lm_head, reduce


def _lm_head(module, split_vocab: bool, hidden: jax.Array) -> jax.Array:
    logits = module.logits(hidden)
    return parallel.gather_vocab(logits) if split_vocab else logits


def _penalized(logits, tables, inputs: StepInputs, penalize: bool | None):
    """The logits the tokens are chosen from (None: the logits themselves)."""
    if penalize is False:
        return None
    sp = inputs.sampling
    slots = jnp.maximum(inputs.meta.seq_slot, 0)

    def apply():
        return penalties.penalize(logits.astype(jnp.float32), tables, slots, sp.presence,
                                  sp.frequency, sp.repetition, sp.min_tokens, sp.counter,
                                  sp.penalized)
    if penalize:
        return apply()
    return jax.lax.cond(jnp.any(sp.penalized), apply, lambda: logits.astype(jnp.float32))


def _score(lm_head, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """[T, 2 + 2K] float32 per row: the log-probability of targets[row] (the next prompt
    token), its rank (1 = most likely; bit-cast int32), the top K ids (bit-cast) and their
    log-probabilities. Rows with target -1 give values that are not read."""
    rows = hidden.shape[0]
    block = max(b for b in range(1, min(rows, SCORE_BLOCK) + 1) if rows % b == 0)

    def one(args):
        h, tg = args
        lp = jax.nn.log_softmax(lm_head(h).astype(jnp.float32), axis=-1)
        top_lp, top_ids = jax.lax.top_k(lp, min(MAX_LOGPROBS, lp.shape[-1]))
        own = jnp.take_along_axis(lp, jnp.maximum(tg, 0)[:, None], axis=-1)
        rank = 1 + jnp.sum(lp > own, axis=-1).astype(jnp.int32)
        return jnp.concatenate([own, _as_f32(rank)[:, None], _as_f32(top_ids.astype(jnp.int32)),
                                top_lp], axis=1)
    out = jax.lax.map(one, (hidden.reshape(rows // block, block, -1),
                            targets.reshape(rows // block, block)))
    return out.reshape(rows, -1)


class Runner:
    """Owns the compiled step functions, the device copy of the weights and last_tokens.

    Args:
      module: the model's NNX module (jvt.models.Model.module). store: its KV store (a
        KVStoreGroup under tensor parallelism).
      shapes: the sorted (T, S) step shapes (EngineConfig.step_shapes).
      devices: the jax.Devices to run on: one, or the tensor-parallel mesh's (jvt.parallel).
      eos_ids: the tokenizer's EOS ids (min_tokens bans them; they end K-step rows).
      decode_steps: K of the K-step decode variant (1: none).
    """

    def __init__(self, module, store, *, shapes, devices, eos_ids: tuple[int, ...],
                 decode_steps: int = 1):
        self.store = store
        self.shapes = sorted(shapes)
        self.decode_steps = decode_steps
        self.graphdef, state = nnx.split(module)
        weights, self.treedef = jax.tree.flatten(state)
        self.tensor_parallel = len(devices)
        self.split_vocab = parallel.vocab_split(module.config, self.tensor_parallel)
        if self.tensor_parallel > 1:
            self.mesh = parallel.make_mesh(devices)
            self.specs = parallel.weight_specs(module, self.tensor_parallel)
            self.weights = parallel.place(weights, self.specs, self.mesh)
            self.inputs_sharding = parallel.replicated(self.mesh)
        else:
            self.mesh, self.specs, self.inputs_sharding = None, None, devices[0]
            self.weights = jax.device_put(weights, devices[0])  # flat list, flattened once
        self.last_tokens = parallel.put(np.zeros(store.slots, np.int32), self.inputs_sharding)
        self.vocab = module.config.vocab_size
        self.eos_ids = tuple(eos_ids)
        self.tables = PenaltyTables.zeros(store.slots, self.vocab, self.inputs_sharding)
        self._set_rows = jax.jit(penalties.set_rows, donate_argnums=0)
        # greedy_only variants per shape: None = decided on the device (see sampling.sample)
        self.variants = (None,) if devices[0].platform == "cpu" else (True, False)
        # (T, S, variant, scoring, K-step, masked) -> compiled step
        self.compiled: dict[tuple[int, int, bool | None, bool, bool, bool], object] = {}
        self.num_compiles = 0

    def warmup(self) -> None:
        """Compile every step shape, greedy-only and sampling, and the K-step variants of the
        shapes pure-decode steps run in, so no step compiles (the scoring variants compile
        when a prompt_logprobs request first needs one)."""
        for shape in self.shapes:
            for greedy_only in self.variants:
                self._compile(*shape, greedy_only, False, False)
        for shape in self.decode_shapes():
            for greedy_only in self.variants:
                self._compile(*shape, greedy_only, False, True)
        empty = penalties.rows(_PLAIN, [0], 1, self.vocab, ())
        self.tables = self._set_rows(self.tables, 0, parallel.put(empty, self.inputs_sharding))

    def temp_bytes(self) -> int:
        """The largest per-device temporary memory of the compiled steps (XLA's estimate)."""
        sizes = [c.memory_analysis() for c in self.compiled.values()]
        return max((m.temp_size_in_bytes for m in sizes if m is not None), default=0)

    def decode_shapes(self) -> list[tuple[int, int]]:
        """The shapes a pure-decode step of 1 .. S_max sequences runs in (K-step variants)."""
        if self.decode_steps == 1:
            return []
        most = max(s for _, s in self.shapes)
        return sorted({bucket(self.shapes, n, n) for n in range(1, most + 1)})

    def _compile(self, t: int, s: int, greedy_only: bool | None, scoring: bool, multi: bool,
                 masked: bool = False):
        key = (t, s, greedy_only, scoring, multi, masked)
        if key not in self.compiled:
            penalize = None if greedy_only is None else not greedy_only
            static = {"t": t, "s": s, "greedy_only": greedy_only, "penalize": penalize,
                      "graphdef": self.graphdef, "treedef": self.treedef,
                      "store_id": self.store.store_id, "tensor_parallel": self.mesh is not None,
                      "split_vocab": self.split_vocab}
            fn = (functools.partial(_multi_step, k=self.decode_steps, masked=masked, **static)
                  if multi else
                  functools.partial(_step, scoring=scoring, masked=masked, **static))
            args = [self.last_tokens, self.tables,
                    *parallel.put(_to_wire(_pack(None, t, s)), self.inputs_sharding)]
            if scoring:
                args.append(parallel.put(np.full(t, -1, np.int32), self.inputs_sharding))
            if multi:
                args.append(parallel.put(_stops(None, s, ()), self.inputs_sharding))
            if masked:
                words = (self.vocab + 31) // 32
                args.append(parallel.put(np.full((s, words), -1, np.int32),
                                           self.inputs_sharding))
            if self.mesh is not None:
                fn = parallel.shard_step(fn, self.mesh, self.specs, num_replicated=len(args))
            step = jax.jit(fn, donate_argnums=(1, 2))
            self.compiled[key] = step.lower(self.weights, *args).compile()
            self.num_compiles += 1
        return self.compiled[key]

    def launch(self, plan: StepPlan, masks: np.ndarray | None = None
               ) -> tuple[jax.Array, jax.Array | None]:
        """Enqueue the step of ``plan``; returns its device results without waiting: the
        samples and, when an entry scores prompt tokens, the scores. masks: None, or the
        [len(plan.entries), ceil(V / 32)] allowed-token bits of a plan with constrained
        entries (the masked variant, compiled when first needed).

        EntryError (nothing enqueued) when one entry cannot be packed."""
        t, s = bucket(self.shapes, plan.num_tokens, len(plan.entries))
        greedy_only = None if self.variants == (None,) else all(
            e.seq.params.temperature == 0 and not e.seq.params.penalized for e in plan.entries)
        wire = _to_wire(_pack(plan, t, s))
        targets = _targets(plan, t)
        multi = plan.steps > 1  # a pure-decode plan: no scores
        extra = [] if targets is None else [targets]
        if multi:
            extra.append(_stops(plan, s, self.eos_ids))
        if masks is not None:
            padded = np.full((s, masks.shape[1]), -1, np.int32)
            padded[:len(masks)] = masks
            extra.append(padded)
        args = parallel.put([*wire, *extra], self.inputs_sharding)
        step = self._compile(t, s, greedy_only, targets is not None, multi, masks is not None)
        self._write_penalty_rows(plan)
        # Every chunk the step reads is mapped before it is dispatched (the CUDA handler maps
        # nothing, so XLA can replay the step as a CUDA graph); one atomic load when the
        # background mapper has already done it.
        self.store.apply_pending()
        self.last_tokens, self.tables, *out = step(self.weights, self.last_tokens, self.tables,
                                                   *args)
        return out[0], (out[1] if len(out) > 1 else None)

    def _write_penalty_rows(self, plan: StepPlan) -> None:
        """The penalty rows of the penalised sequences this plan runs for the first time
        since they got their slot (what the host knows of them is complete then)."""
        for e in plan.entries:
            seq = e.seq
            if seq.params.penalized and not seq.penalty_rows_written:
                row = penalties.rows(seq.params, seq.tokens, seq.num_prompt, self.vocab,
                                     self.eos_ids)
                self.tables = self._set_rows(self.tables, seq.slot,
                                             parallel.put(row, self.inputs_sharding))
                seq.penalty_rows_written = True

    @staticmethod
    def collect(launched: tuple[jax.Array, jax.Array | None]
                ) -> tuple[list[SampleResult], Scores | None]:
        """Wait for a launched step and unpack its results into host numpy arrays: one
        SampleResult per decode iteration (one unless the step was a K-step call)."""
        out, scores = launched
        host = np.asarray(out)
        if host.ndim == 2:
            host = host[None]
        k = (host.shape[2] - 2) // 2
        samples = [SampleResult(tokens=h[:, 0].view(np.int32), logprob=h[:, 1],
                                top_ids=h[:, 2:2 + k].view(np.int32), top_logprobs=h[:, 2 + k:])
                   for h in host]
        if scores is None:
            return samples, None
        sc = np.asarray(scores)
        return samples, Scores(logprob=sc[:, 0], rank=sc[:, 1].view(np.int32),
                               top_ids=sc[:, 2:2 + k].view(np.int32), top_logprobs=sc[:, 2 + k:])


@dataclasses.dataclass(frozen=True)
class Scores:
    """Host copy of a scoring step's per-row results (T rows, K = min(MAX_LOGPROBS, V))."""

    logprob: np.ndarray  # [T] float32 log-probability of the row's next prompt token
    rank: np.ndarray  # [T] int32 its rank (1: the most likely token)
    top_ids: np.ndarray  # [T, K] int32
    top_logprobs: np.ndarray  # [T, K] float32


_PLAIN = SamplingParams()


def scores_prompt(e: Entry) -> bool:
    """Whether entry ``e`` holds prompt rows whose next-token log-probabilities are asked."""
    return (e.seq.params.prompt_logprobs is not None and not e.from_device
            and e.start + 1 < e.seq.num_prompt)


def _stops(plan: StepPlan | None, s: int, eos_ids: tuple[int, ...]) -> np.ndarray:
    """[s, 1 + MAX_DEVICE_STOPS] int32 of a K-step call: per entry its iterations, then the
    token ids that end it (EOS unless ignore_eos, then stop_token_ids; -1 pads)."""
    stops = np.full((s, 1 + MAX_DEVICE_STOPS), -1, np.int32)
    stops[:, 0] = 0
    for i, e in enumerate(plan.entries if plan is not None else []):
        p = e.seq.params
        ids = ([] if p.ignore_eos else list(eos_ids)) + list(p.stop_token_ids)
        ids = ids[:MAX_DEVICE_STOPS]
        stops[i, 0] = e.steps
        stops[i, 1:1 + len(ids)] = ids
    return stops


def _targets(plan: StepPlan, t: int) -> np.ndarray | None:
    """[t] next prompt token of every scored row (-1 elsewhere), or None when no entry of the
    plan scores its prompt."""
    if not any(scores_prompt(e) for e in plan.entries):
        return None
    targets = np.full(t, -1, np.int32)
    row = 0
    for e in plan.entries:
        if scores_prompt(e):
            seq = e.seq
            end = min(e.start + e.n, seq.num_prompt - 1)  # positions predicting a prompt token
            targets[row:row + end - e.start] = seq.tokens[e.start + 1:end + 1]
        row += e.n
    return targets


class EntryError(Exception):
    """Packing entry ``index`` of a plan failed with ``cause`` (the other entries are fine)."""

    def __init__(self, index: int, cause: Exception):
        super().__init__(f"entry {index}: {cause!r}")
        self.index = index
        self.cause = cause


def _pack(plan: StepPlan | None, t: int, s: int) -> StepInputs:
    """numpy StepInputs of ``plan`` padded to (t, s); plan None gives an all-padding step.
    EntryError names the first entry that cannot be packed."""
    tokens = np.zeros(t, np.int32)
    prev_slot = np.full(t, -1, np.int32)
    positions = np.zeros(t, np.int32)
    seq_start = np.zeros(s + 1, np.int32)
    seq_slot = np.full(s, -1, np.int32)
    seq_len = np.zeros(s, np.int32)
    keep = np.zeros(s, bool)
    sampling = SamplingArrays.empty(s)
    entries = plan.entries if plan is not None else []
    row = 0
    for i, e in enumerate(entries):
        try:
            if e.from_device:
                prev_slot[row] = e.seq.slot
            else:
                tokens[row:row + e.n] = e.tokens
            positions[row:row + e.n] = np.arange(e.start, e.start + e.n)
            seq_slot[i], seq_len[i], keep[i] = e.seq.slot, e.start + e.n, e.samples
            sampling.set_row(i, e.seq.params, e.seq.seed, e.counter)
        except Exception as err:
            raise EntryError(i, err) from err
        row += e.n
        seq_start[i + 1] = row
    seq_start[len(entries) + 1:] = row
    meta = AttnMeta(positions, seq_start, seq_slot, seq_len)
    return StepInputs(tokens, prev_slot, meta, keep, sampling)
