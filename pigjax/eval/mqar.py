"""Multi-query associative recall (MQAR, Zoology: Arora et al., 2023): a synthetic memory task,
and the training and evaluation of Llama, Memory Mosaics v1 and v2 on it (scripts/eval_mqar.py).

A sequence of length T with P pairs (vocabulary V, token 0 the filler):

    k_1 v_1 k_2 v_2 ... k_P v_P   0 0 k_3 v_3 0 0 0 0 k_1 v_1 ... 0

keys are P distinct tokens of [1, V/2), values tokens of [V/2, V); after the pairs, each key is
queried once, at a random place (a key followed by its value, in random order, the rest filler).
The model is scored at each queried key: the next token must be its value. Accuracy is the
fraction of queries whose argmax is the right value. Needs T >= 4P.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pigjax.errors import PigjaxError


def make_batch(rng: np.random.Generator, batch: int, seq_len: int, num_pairs: int, vocab_size: int):
    """(tokens [B, T] int32, targets [B, T] int32): targets[b, p] is the value the query key at p
    must be followed by, −1 where nothing is scored."""
    if num_pairs < 1 or vocab_size // 2 - 1 < num_pairs or seq_len < 4 * num_pairs:
        raise PigjaxError(f"MQAR needs 1 <= pairs <= V/2 - 1 and T >= 4 * pairs; got pairs {num_pairs}, "
                          f"T {seq_len}, V {vocab_size}")
    half, p = vocab_size // 2, num_pairs
    keys = np.stack([rng.choice(np.arange(1, half), p, replace=False) for _ in range(batch)])
    values = rng.integers(half, vocab_size, (batch, p))
    tokens = np.zeros((batch, seq_len), np.int32)
    targets = np.full((batch, seq_len), -1, np.int32)
    tokens[:, 0:2 * p:2], tokens[:, 1:2 * p:2] = keys, values
    slots = (seq_len - 2 * p) // 2  # query slots of two tokens after the pairs
    rows = np.arange(batch)[:, None]
    where = 2 * p + 2 * np.sort(np.stack([rng.choice(slots, p, replace=False) for _ in range(batch)]), axis=1)
    order = np.stack([rng.permutation(p) for _ in range(batch)])
    tokens[rows, where], tokens[rows, where + 1] = keys[rows, order], values[rows, order]
    targets[rows, where] = values[rows, order]
    return tokens, targets


def masked_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy over the scored positions (targets >= 0)."""
    mask = targets >= 0
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1)


def correct(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(right answers, scored positions) of a batch."""
    mask = targets >= 0
    return jnp.sum((jnp.argmax(logits, -1) == targets) & mask), jnp.sum(mask)


@dataclasses.dataclass(frozen=True)
class Task:
    """The training distribution: sequences of `seq_len` with a number of pairs drawn from `pairs`."""

    vocab_size: int = 256
    seq_len: int = 256
    pairs: tuple[int, ...] = (4, 8, 16, 32)
    batch: int = 32


def train(built, task: Task, tx: optax.GradientTransformation, steps: int, seed: int = 0, log=print):
    """Train `built` (a pigjax.train.Built) on MQAR for `steps` steps -> (params, losses, seconds)."""
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed + 1, impl="rbg")

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens, targets, i):
        def loss_fn(p):
            return masked_loss(built.forward(p, tokens, jax.random.fold_in(key, i)), targets)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = built.init(seed)
    opt_state = tx.init(params)
    losses, began = [], time.perf_counter()
    for i in range(steps):
        tokens, targets = make_batch(rng, task.batch, task.seq_len, int(rng.choice(task.pairs)), task.vocab_size)
        params, opt_state, loss = step(params, opt_state, tokens, targets, i)
        losses.append(float(loss))
        if log and (i + 1) % max(steps // 10, 1) == 0:
            log(f"  step {i + 1}/{steps}: loss {np.mean(losses[-20:]):.3f} ({time.perf_counter() - began:.0f} s)")
    return params, losses, time.perf_counter() - began


def accuracy(forward, params, task: Task, seq_len: int, num_pairs: int, sequences: int, seed: int = 1234) -> float:
    """Accuracy on `sequences` fresh sequences of length seq_len with num_pairs pairs."""
    rng = np.random.default_rng([seed, seq_len, num_pairs])
    right = total = 0
    fn = jax.jit(lambda p, t, y: correct(forward(p, t, None), y))
    batch = max(1, min(task.batch, 8192 // seq_len))
    for lo in range(0, sequences, batch):
        tokens, targets = make_batch(rng, min(batch, sequences - lo), seq_len, num_pairs, task.vocab_size)
        r, n = fn(params, tokens, targets)
        right, total = right + int(r), total + int(n)
    return right / total
