"""`pigjax.generate`: ragged batches of prompts -> text, with a jit-compiled decode loop.

Prefill runs the whole (padded) batch in one jitted call; decoding is a `lax.while_loop` over a
`DecodeState` pytree inside one jitted call, the state (KV cache included) donated so it is updated
in place. Streaming runs the same loop in chunks of steps and hands new tokens to a callback
between chunks. Shapes are bucketed (batch, prompt length, cache capacity, output length) so that
calls of similar size reuse the compiled programs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pigjax import sharding
from pigjax.attention.backend import Backend, Cache
from pigjax.attention.dense import Dense
from pigjax.errors import PigjaxError
from pigjax.families import Family, family_of
from pigjax.model import Model
from pigjax.sampling import Sampler, check_seed

FINISH_REASONS = ("running", "eos", "stop", "length")  # index = DecodeState.finish code
STREAM_CHUNK = 8  # decode steps per jitted call when streaming


@dataclasses.dataclass
class Generation:
    """texts (None without a tokenizer) end before a stop sequence; tokens include EOS/stop tokens."""

    texts: list[str] | None
    tokens: list[list[int]]
    finish_reasons: list[str]
    stats: dict


@struct.dataclass
class DecodeState:
    cache: Cache  # the back-end's layout (a Memory Mosaics model: its decode state)
    out: jax.Array  # [B, N] generated tokens
    count: jax.Array  # [B] tokens generated so far per row
    finish: jax.Array  # [B] index into FINISH_REASONS; 0 while running
    keys: jax.Array  # [B] PRNG key per row; token i of row b uses fold_in(keys[b], i)
    steps: jax.Array  # scalar: decode iterations run


@struct.dataclass
class Stops:
    """What ends a row: EOS ids, token-level stop sequences (right-aligned, -1 padded), a budget."""

    eos: jax.Array  # [E] int32
    seqs: jax.Array  # [S, Lmax] int32, -1 = no constraint
    max_new: jax.Array  # scalar int32


def bucket(n: int, minimum: int = 16, step: int = 256) -> int:
    """Powers of two up to `step`, then multiples of `step`: bounded waste, few distinct shapes."""
    n = max(n, minimum)
    if n <= step:
        return 1 << (n - 1).bit_length()
    return -(-n // step) * step


def _finish_codes(out, count, finish, stops: Stops):
    """Finish code of each row after its newest token (rows already finished keep theirs)."""
    b, n = out.shape
    newest = out[jnp.arange(b), count - 1]
    is_eos = jnp.isin(newest, stops.eos)
    # Stop sequence s matches if the last Lmax generated tokens equal it where it is not -1.
    lmax = stops.seqs.shape[1]
    idx = count[:, None] - lmax + jnp.arange(lmax)[None, :]
    tail = jnp.where(idx >= 0, out[jnp.arange(b)[:, None], jnp.clip(idx, 0, n - 1)], -2)
    matches = (stops.seqs[None] == -1) | (stops.seqs[None] == tail[:, None, :])
    is_stop = jnp.any(jnp.all(matches, axis=-1) & jnp.any(stops.seqs >= 0, axis=-1)[None], axis=-1)
    code = jnp.where(is_eos, 1, jnp.where(is_stop, 2, jnp.where(count >= stops.max_new, 3, 0)))
    return jnp.where(finish > 0, finish, code).astype(jnp.int32)


def _row_keys(keys, index):
    return jax.vmap(jax.random.fold_in)(keys, index)


@partial(jax.jit, static_argnames=("config", "sampler", "out_len"))
def _prefill(params, tokens, lengths, live, keys, stops, *, config, sampler, out_len):
    """Dense prefill of the padded prompts: -> (per-layer K/V of the prompts, first tokens state)."""
    b = tokens.shape[0]
    family = family_of(config)
    dtype = jax.tree.leaves(params)[0].dtype
    cache = family.init_cache(Dense(), config, b, tokens.shape[1], 0, dtype, None)
    logits, cache = family.step(params, config, tokens, cache, lengths, Dense(), True, logits_at=lengths - 1)
    return (cache.layers, *_first_tokens(logits[:, 0], live, keys, stops, sampler, out_len))


def _first_tokens(last, live, keys, stops, sampler, out_len):
    """(out, count, finish) after sampling each row's first token from its last prompt logits [B, V]."""
    b = last.shape[0]
    first = sampler(last, _row_keys(keys, jnp.zeros((b,), jnp.int32)))
    out = jnp.zeros((b, out_len), jnp.int32).at[:, 0].set(first)
    count = jnp.ones((b,), jnp.int32)
    padding_done = jnp.where(live, 0, FINISH_REASONS.index("length")).astype(jnp.int32)
    return out, count, _finish_codes(out, count, padding_done, stops)


@partial(jax.jit, static_argnames=("config", "backend", "sampler", "capacity", "out_len"))
def _prefill_own(params, tokens, lengths, live, keys, stops, runtime, *, config, backend, sampler, capacity,
                 out_len):
    """A back-end's own prefill of the padded prompts (families that share no prefill)."""
    family = family_of(config)
    dtype = jax.tree.leaves(params)[0].dtype
    cache = family.init_cache(backend, config, tokens.shape[0], capacity, out_len, dtype, runtime)
    logits, cache = family.step(params, config, tokens, cache, lengths, backend, True)
    last = logits[jnp.arange(tokens.shape[0]), lengths - 1]
    return (cache, *_first_tokens(last, live, keys, stops, sampler, out_len))


def _fork(prefix, lengths, runtime, *, config, backend, capacity, out_len):
    """The back-end's cache from the shared dense prefill (e.g. MagicPIG builds its tables here)."""
    dtype = prefix[0].k.dtype
    return backend.from_prefill(config, prefix, lengths, capacity, out_len, dtype, runtime)


@partial(jax.jit, static_argnames=("config", "backend", "sampler"), donate_argnums=(0,))
def _decode(state: DecodeState, params, stops, limit, *, config, backend, sampler) -> DecodeState:
    """Decode until every row has finished or `limit` loop iterations have run in total."""
    rows = jnp.arange(state.out.shape[0])

    def cond(s: DecodeState):
        return (s.steps < limit) & jnp.any(s.finish == 0)

    def body(s: DecodeState):
        running = s.finish == 0
        last = s.out[rows, s.count - 1]
        logits, cache = family_of(config).step(params, config, last[:, None], s.cache, running.astype(jnp.int32),
                                               backend, False)
        token = sampler(logits[:, 0], _row_keys(s.keys, s.count))
        slot = jnp.where(running, s.count, s.out.shape[1])  # finished rows write nothing (dropped)
        out = s.out.at[rows, slot].set(token, mode="drop")
        count = s.count + running
        finish = _finish_codes(out, count, s.finish, stops)
        return DecodeState(cache, out, count, finish, s.keys, s.steps + 1)

    return jax.lax.while_loop(cond, body, state)


@contextlib.contextmanager
def _compile_timer():
    """Seconds JAX spends tracing/lowering/compiling inside the block (read via jax.monitoring)."""
    total = [0.0]

    def listener(event, seconds, **_):
        if event.startswith("/jax/core/compile/"):
            total[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield total
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _encode_prompts(model: Model, prompts, chat: bool) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise PigjaxError("prompts must be a non-empty list of strings or of token-id lists")
    tok = model.tokenizer
    encoded = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tok is None:
                raise PigjaxError("string prompts need a tokenizer; this checkpoint has none (pass token ids)")
            if chat:
                if not getattr(tok, "chat_template", None):
                    raise PigjaxError("chat=True needs a tokenizer with a chat template; this one has none "
                                      "(pass chat=False and format the prompt yourself)")
                ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"]
            else:
                ids = tok(p)["input_ids"]
        else:
            if chat:
                raise PigjaxError("chat=True needs string prompts (the template is applied to text)")
            ids = [int(t) for t in np.asarray(p).reshape(-1)]
        if len(ids) == 0:
            raise PigjaxError(f"prompt {i} is empty")
        bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
        if bad:
            raise PigjaxError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {model.config.vocab_size})")
        encoded.append(list(ids))
    return encoded


def _stop_table(model: Model, stop) -> tuple[np.ndarray, list[str]]:
    """Token sequences of the stop strings (or id lists), right-aligned in a -1 padded table."""
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    strings, seqs = [], []
    for s in stop:
        if isinstance(s, str):
            if not s:
                raise PigjaxError("stop sequences must be non-empty")
            if model.tokenizer is None:
                raise PigjaxError("string stop sequences need a tokenizer; pass token-id lists")
            strings.append(s)
            # Byte-level BPE spells "x" and " x" differently; mid-text a stop usually follows a space.
            variants = {s} | ({" " + s} if not s[0].isspace() else set())
            seqs.extend(model.tokenizer(v, add_special_tokens=False)["input_ids"] for v in sorted(variants))
        else:
            seqs.append([int(t) for t in s])
    lmax = max([len(s) for s in seqs] + [1])
    table = np.full((max(len(seqs), 1), lmax), -1, np.int32)
    for i, s in enumerate(seqs):
        table[i, lmax - len(s):] = s
    return table, strings


def generate(
    model: Model,
    prompts,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop=None,
    attention=None,
    chat: bool = False,
    stream: Callable[[int, list[int]], None] | None = None,
    mesh=None,
) -> Generation | list[Generation]:
    """Generate up to `max_new_tokens` for each prompt (strings or token-id lists, ragged).

    `stop`: strings (or token-id lists) that end a row; matched on tokens inside the loop, and on
    text afterwards (texts are cut before the first occurrence). `stream(row, new_tokens)` is
    called as tokens arrive (every STREAM_CHUNK steps). `attention`: the back-end (Dense()), or a
    list of back-ends to compare: they share one dense prefill (prefill is dense for every
    back-end) and the call returns one Generation per back-end, in order. An entry of the list may
    be a function of the Generations before it that returns a back-end: it is called once those
    have run, so that e.g. `lambda gens: TopK(gens[0].stats["fraction_read"])` decodes at the
    fraction a MagicPIG back-end measured, on the same prefill. A Memory Mosaics model takes
    Dense() (exact retrieval) or MagicPIG(...) (sampled retrieval, pigjax.models.mosaics_memory) and
    runs one (exact) prefill per back-end (its family shares no prefill: `pigjax.families`).
    `mesh`: a `jax.sharding.Mesh` with axes "data" and "model" to decode on (`pigjax.sharding`):
    rows split over "data" (the batch is padded to a multiple of its size), heads and the MLP over
    "model"; in a multi-process run (`jax.distributed`) every process makes the same call.
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise PigjaxError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    check_seed("generate", seed)
    mesh = None if mesh is None else sharding.check_mesh(mesh)
    sampler = Sampler(temperature, top_k, top_p)
    several = isinstance(attention, (list, tuple))
    backends = list(attention) if several else [attention if attention is not None else Dense()]
    if not backends:
        raise PigjaxError("attention: an empty list of back-ends")
    if several and stream is not None:
        raise PigjaxError("stream needs a single attention back-end, not a list")
    config = model.config
    ids = _encode_prompts(model, prompts, chat)
    lengths = [len(p) for p in ids]
    for i, n in enumerate(lengths):
        if n + max_new_tokens > config.max_position_embeddings:
            what = "is longer than" if n > config.max_position_embeddings else "plus max_new_tokens exceeds"
            raise PigjaxError(f"prompt {i} ({n} tokens) {what} the model's context ({config.max_position_embeddings})")
    stop_table, stop_strings = _stop_table(model, stop)
    eos = sorted(set(config.eos_token_ids) | ({model.tokenizer.eos_token_id} if model.tokenizer is not None
                                               and model.tokenizer.eos_token_id is not None else set()))
    n_rows = len(ids)
    family = family_of(config)
    if not family.shares_prefill and any(_deferred(entry) for entry in backends):
        raise PigjaxError("a back-end given as a function of earlier Generations needs a model family that shares "
                          "one prefill among back-ends (Llama)")
    # The family's decode back-end of each entry, checked before the prefill; deferred entries when called.
    backends = [entry if _deferred(entry) else family.decoder(entry) for entry in backends]
    if max_new_tokens == 0:
        gens = []
        for entry in backends:
            backend = _resolve(entry, gens, family)
            gens.append(Generation(["" for _ in ids] if model.tokenizer else None, [[] for _ in ids],
                                   ["length"] * n_rows, {"prefill_seconds": 0.0, "decode_tokens_per_second": 0.0,
                                                         "compile_seconds": 0.0, **backend.stats(config, model.dtype)}))
    else:
        with sharding.use(mesh):
            gens = _generate(model, ids, lengths, max_new_tokens, sampler, backends, seed, stop_table, stop_strings,
                             eos, stream, mesh)
    return gens if several else gens[0]


def _deferred(entry) -> bool:
    return callable(entry) and not isinstance(entry, Backend)


def _resolve(entry, gens: list[Generation], family: Family):
    """The back-end of an attention-list entry: itself, or a deferred entry called on the Generations so far."""
    if not _deferred(entry):
        return entry
    backend = entry(list(gens))
    if backend is None:  # None means Dense() only as `attention` itself, not from a deferred entry
        raise PigjaxError(f"attention: expected a back-end (e.g. pigjax.Dense()) from {entry!r}, got None")
    return family.decoder(backend)


def _generate(model, ids, lengths, max_new_tokens, sampler, backends, seed, stop_table, stop_strings,
              eos, stream, mesh) -> list[Generation]:
    config = model.config
    n_rows = len(ids)

    # Bucketed shapes; padding rows hold one token and are finished before they start.
    b = 1 << (n_rows - 1).bit_length()
    if mesh is not None:  # rows split evenly over the data axis
        b = -(-b // sharding.axis_size(mesh, sharding.DATA)) * sharding.axis_size(mesh, sharding.DATA)
    t = bucket(max(lengths))
    capacity = bucket(max(t, max(lengths) + max_new_tokens))
    out_len = bucket(max_new_tokens)
    tokens = np.zeros((b, t), np.int32)
    for i, p in enumerate(ids):
        tokens[i, : len(p)] = p
    row_lengths = np.array(lengths + [1] * (b - n_rows), np.int32)
    base = jax.random.key(seed)
    key_data = np.asarray(jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(b))))
    tokens, row_lengths, live, key_data = sharding.put_batch(mesh, tokens, row_lengths, np.arange(b) < n_rows, key_data)
    keys = jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(base))
    stops = sharding.replicate(mesh, Stops(np.asarray(eos or [-1], np.int32), stop_table,
                                           np.asarray(max_new_tokens, np.int32)))
    family = family_of(config)
    params = model.params if mesh is None else sharding.shard_params(config, model.params, mesh)
    if not family.shares_prefill:
        return [_generate_own_prefill(model, params, backend, tokens, row_lengths, live, n_rows, keys, stops, sampler,
                                      capacity, out_len, lengths, max_new_tokens, stop_strings, stream, mesh)
                for backend in backends]
    with _compile_timer() as compile_prefill:
        start = time.perf_counter()
        params = family.decode_params(params)
        prefix, out, count, finish = _prefill(params, tokens, row_lengths, live, keys, stops,
                                              config=config, sampler=sampler, out_len=out_len)
        jax.block_until_ready(prefix)
        prefill_seconds = time.perf_counter() - start - compile_prefill[0]
    shape = dict(b=b, t=t, capacity=capacity, out_len=out_len, prefill_seconds=prefill_seconds,
                 prefill_compile=compile_prefill[0])
    gens = []
    for entry in backends:
        backend = _resolve(entry, gens, family)
        with backend.resources(config, b, family.engine_capacity(t, capacity)) as runtime:
            with _compile_timer() as compile_fork:
                start = time.perf_counter()
                cache = _fork(prefix, row_lengths, sharding.replicate(mesh, runtime.arrays), config=config,
                              backend=backend, capacity=capacity, out_len=out_len)
                jax.block_until_ready(cache)
                runtime.ready()
                fork_seconds = time.perf_counter() - start - compile_fork[0]
            # _decode donates its state: each back-end gets its own copy of the shared arrays.
            state = DecodeState(cache, *(jnp.copy(x) for x in (out, count, finish, keys)),
                                sharding.replicate(mesh, np.zeros((), np.int32)))
            gens.append(_decode_all(model, params, state, stops, sampler, backend, runtime, lengths, max_new_tokens,
                                    stop_strings, stream, dict(shape, fork_seconds=fork_seconds,
                                                               fork_compile=compile_fork[0])))
    return gens


def _generate_own_prefill(model, params, backend, tokens, row_lengths, live, n_rows, keys, stops, sampler, capacity,
                          out_len, lengths, max_new_tokens, stop_strings, stream, mesh) -> Generation:
    """One back-end with its own prefill (Memory Mosaics: exact and sampled retrieval keep different states)."""
    b, t = tokens.shape
    family = family_of(model.config)
    params = family.decode_params(params)
    with backend.resources(model.config, b, family.engine_capacity(t, capacity)) as runtime:
        with _compile_timer() as compile_prefill:
            start = time.perf_counter()
            state = _prefill_own(params, tokens, row_lengths, live, keys, stops,
                                 sharding.replicate(mesh, runtime.arrays), config=model.config, backend=backend,
                                 sampler=sampler, capacity=capacity, out_len=out_len)
            jax.block_until_ready(state)
            runtime.ready()
            prefill_seconds = time.perf_counter() - start - compile_prefill[0]
        state = DecodeState(*state, jnp.copy(keys), sharding.replicate(mesh, np.zeros((), np.int32)))
        shape = dict(b=b, t=t, capacity=capacity, out_len=out_len, prefill_seconds=prefill_seconds,
                     prefill_compile=compile_prefill[0], fork_seconds=0.0, fork_compile=0.0)
        return _decode_all(model, params, state, stops, sampler, backend, runtime, lengths, max_new_tokens,
                           stop_strings, stream, shape)


def _decode_all(model, params, state, stops, sampler, backend, runtime, lengths, max_new_tokens, stop_strings,
                stream, shape) -> Generation:
    config = model.config
    n_rows = len(lengths)
    static = dict(config=config, backend=backend, sampler=sampler)
    emitted = [0] * n_rows

    def emit(state):
        if stream is None:
            return
        out, count = sharding.gather(state.out), sharding.gather(state.count)
        for r in range(n_rows):
            if count[r] > emitted[r]:
                stream(r, out[r, emitted[r]: count[r]].tolist())
                emitted[r] = int(count[r])

    emit(state)
    with _compile_timer() as compile_decode:
        start = time.perf_counter()
        limit = max_new_tokens - 1
        chunk = STREAM_CHUNK if stream is not None else limit
        while int(state.steps) < limit and bool(jnp.any(state.finish == 0)):
            state = _decode(state, params, stops, jnp.int32(min(int(state.steps) + chunk, limit)), **static)
            emit(state)
        jax.block_until_ready(state)
        decode_seconds = time.perf_counter() - start - compile_decode[0]

    out, count, finish = (sharding.gather(x)[:n_rows] for x in (state.out, state.count, state.finish))
    new_tokens = [out[r, : count[r]].tolist() for r in range(n_rows)]
    reasons = [FINISH_REASONS[f] for f in finish]
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(toks, skip_special_tokens=True) for toks in new_tokens]
        for r, text in enumerate(texts):
            cuts = [text.find(s) for s in stop_strings if s in text]
            if cuts:
                texts[r] = text[: min(cuts)]
                reasons[r] = "stop"
    decoded = int(count.sum()) - n_rows  # the first token of each row comes from prefill
    stats = {
        # The dense prefill (shared when several back-ends are compared), then the back-end's own
        # preparation of its cache (MagicPIG: centering, hashing, table build).
        "prefill_seconds": shape["prefill_seconds"] + shape["fork_seconds"],
        "prefill_tokens_per_second": sum(lengths) / max(shape["prefill_seconds"] + shape["fork_seconds"], 1e-9),
        "cache_build_seconds": shape["fork_seconds"],
        "decode_seconds": decode_seconds,
        "decode_tokens": decoded,
        "decode_tokens_per_second": decoded / decode_seconds if decode_seconds > 0 and decoded else 0.0,
        "compile_seconds": shape["prefill_compile"] + shape["fork_compile"] + compile_decode[0],
        "batch_bucket": shape["b"], "prompt_bucket": shape["t"], "capacity": shape["capacity"],
        **backend.stats(config, model.dtype, state.cache, runtime),
    }
    return Generation(texts, new_tokens, reasons, stats)
