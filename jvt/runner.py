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
enqueued before the host has read step N-1's tokens (one-step lag).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jvt import parallel
from jvt.config import bucket
from jvt.sampling import SampleResult, SamplingArrays, sample
from jvt.scheduler import StepPlan
from jvt.types import AttnMeta


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
            sp.top_k, sp.seed, sp.counter]


def _to_wire(i: StepInputs) -> tuple[np.ndarray, np.ndarray]:
    """One int32 and one float32 host array (two transfers per step instead of thirteen)."""
    ints = [np.asarray(a).astype(np.int32) if a.dtype == bool else np.asarray(a).view(np.int32)
            for a in _int_fields(i)]
    sp = i.sampling
    return np.concatenate(ints), np.concatenate([sp.temperature, sp.top_p, sp.min_p])


def _from_wire(ints: jax.Array, floats: jax.Array, t: int, s: int) -> StepInputs:
    sizes = [t, t, t, s + 1, s, s, s, s, s, s]
    parts = jnp.split(ints, np.cumsum(sizes)[:-1])
    tokens, prev_slot, positions, seq_start, seq_slot, seq_len, keep, top_k, seed, counter = parts
    temperature, top_p, min_p = jnp.split(floats, 3)
    sampling = SamplingArrays(temperature, top_k, top_p, min_p,
                              jax.lax.bitcast_convert_type(seed, jnp.uint32), counter)
    meta = AttnMeta(positions, seq_start, seq_slot, seq_len)
    return StepInputs(tokens, prev_slot, meta, keep.astype(bool), sampling)


def _step(weights, last_tokens, ints, floats, *, t, s, greedy_only, graphdef, treedef,
          store_id, tensor_parallel, split_vocab):
    """One engine step: returns the new last_tokens and [S, 2 + 2K] float32 results (token id
    and top ids bit-cast), read back in one transfer. weights: the module's flat state (one
    device's shards under tensor parallelism, where this runs inside shard_map)."""
    module = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))
    inputs = _from_wire(ints, floats, t, s)
    prev = last_tokens[jnp.maximum(inputs.prev_slot, 0)]
    tokens = jnp.where(inputs.prev_slot >= 0, prev, inputs.tokens)
    reduce = parallel.all_reduce if tensor_parallel else (lambda x: x)
    hidden = module(tokens, inputs.meta, store_id=store_id, reduce=reduce)
    last_rows = jnp.maximum(inputs.meta.seq_start[1:] - 1, 0)  # [S] each entry's last row
    logits = module.logits(hidden[last_rows])
    if split_vocab:
        logits = parallel.gather_vocab(logits)
    r = sample(logits, inputs.sampling, greedy_only=greedy_only)
    slots = last_tokens.shape[0]
    target = jnp.where(inputs.keep, inputs.meta.seq_slot, slots)  # out of range: dropped
    last_tokens = last_tokens.at[target].set(r.tokens, mode="drop")
    as_f32 = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.float32)
    out = jnp.concatenate([as_f32(r.tokens)[:, None], r.logprob[:, None], as_f32(r.top_ids),
                           r.top_logprobs], axis=1)
    return last_tokens, out


class Runner:
    """Owns the compiled step functions, the device copy of the weights and last_tokens.

    Args:
      module: the model's NNX module (jvt.models.Model.module). store: its KV store (a
        KVStoreGroup under tensor parallelism).
      shapes: the sorted (T, S) step shapes (EngineConfig.step_shapes).
      devices: the jax.Devices to run on: one, or the tensor-parallel mesh's (jvt.parallel).
    """

    def __init__(self, module, store, *, shapes, devices):
        self.store = store
        self.shapes = sorted(shapes)
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
        self.last_tokens = jax.device_put(np.zeros(store.slots, np.int32),
                                          self.inputs_sharding)
        # greedy_only variants per shape: None = decided on the device (see sampling.sample)
        self.variants = (None,) if devices[0].platform == "cpu" else (True, False)
        self.compiled: dict[tuple[int, int, bool | None], object] = {}  # (T, S, variant)
        self.num_compiles = 0

    def warmup(self) -> None:
        """Compile every step shape, greedy-only and sampling, so no step compiles."""
        for shape in self.shapes:
            for greedy_only in self.variants:
                self._compile(*shape, greedy_only)

    def temp_bytes(self) -> int:
        """The largest per-device temporary memory of the compiled steps (XLA's estimate)."""
        sizes = [c.memory_analysis() for c in self.compiled.values()]
        return max((m.temp_size_in_bytes for m in sizes if m is not None), default=0)

    def _compile(self, t: int, s: int, greedy_only: bool | None):
        key = (t, s, greedy_only)
        if key not in self.compiled:
            fn = functools.partial(_step, t=t, s=s, greedy_only=greedy_only,
                                   graphdef=self.graphdef, treedef=self.treedef,
                                   store_id=self.store.store_id,
                                   tensor_parallel=self.mesh is not None,
                                   split_vocab=self.split_vocab)
            if self.mesh is not None:
                fn = parallel.shard_step(fn, self.mesh, self.specs, num_replicated=3)
            step = jax.jit(fn, donate_argnums=1)
            ints, floats = jax.device_put(_to_wire(_pack(None, t, s)), self.inputs_sharding)
            self.compiled[key] = step.lower(self.weights, self.last_tokens, ints,
                                            floats).compile()
            self.num_compiles += 1
        return self.compiled[key]

    def launch(self, plan: StepPlan) -> jax.Array:
        """Enqueue the step of ``plan``; returns its device results without waiting.

        EntryError (nothing enqueued) when one entry cannot be packed."""
        t, s = bucket(self.shapes, plan.num_tokens, len(plan.entries))
        greedy_only = None if self.variants == (None,) else \
            all(e.seq.params.temperature == 0 for e in plan.entries)
        ints, floats = jax.device_put(_to_wire(_pack(plan, t, s)), self.inputs_sharding)
        step = self._compile(t, s, greedy_only)
        # Every chunk the step reads is mapped before it is dispatched (the CUDA handler maps
        # nothing, so XLA can replay the step as a CUDA graph); one atomic load when the
        # background mapper has already done it.
        self.store.apply_pending()
        self.last_tokens, out = step(self.weights, self.last_tokens, ints, floats)
        return out

    @staticmethod
    def collect(out: jax.Array) -> SampleResult:
        """Wait for a launched step and unpack its results into host numpy arrays."""
        host = np.asarray(out)
        k = (host.shape[1] - 2) // 2
        return SampleResult(tokens=host[:, 0].view(np.int32), logprob=host[:, 1],
                            top_ids=host[:, 2:2 + k].view(np.int32), top_logprobs=host[:, 2 + k:])


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
