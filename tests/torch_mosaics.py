"""Memory Mosaics v1 and v2 in plain PyTorch, written from docs/algorithm.md §3 and §3A as the
reference for pigjax.models.mosaics and pigjax.models.mosaics_v2.

Deliberately the obvious way: the leaky averages are the recursion k̄_T = W_k x_T + e^{-β} k̄_{T-1}
run token by token, and contextual memory is a loop over query positions, each a softmax over the
strictly earlier keys. v2 likewise: the gated average token by token, and for each query the
list of pairs it sees (short-term: the last h; long-term: at least m old), n = their number, and
β(n) computed from it. Every parameter is its own per-layer tensor; `from_jax` copies pigjax
parameters in (Linear kernels transposed, stacked layers split) and `grads_as_jax` puts gradients
back into the pigjax tree layout. Run it in float64 to get the exact answer to compare against.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class LeakyKeys(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.key_proj = nn.Linear(d, d, bias=False)
        self.decay = nn.Parameter(torch.zeros(heads))  # a_h: β_h = 10|a_h|
        self.key_scale = nn.Parameter(torch.zeros(heads))  # c_h: b_h = min(10 c_h, 5)

    def forward(self, x):  # x [B, T, d] -> keys [B, T, H, hs]
        b, t, d = x.shape
        kx = self.key_proj(x).view(b, t, self.heads, d // self.heads)
        keep = torch.exp(-10 * self.decay.abs())[:, None]
        kbar, out = torch.zeros_like(kx[:, 0]), []
        for i in range(t):
            kbar = kx[:, i] + keep * kbar
            out.append(kbar)
        kbar = torch.stack(out, dim=1)
        scale = torch.exp(torch.clamp(10 * self.key_scale, max=5.0))[:, None]
        return scale * F.normalize(kbar, dim=-1)


class ContextMemory(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.keys = LeakyKeys(d, heads)
        self.value_proj = nn.Linear(d, d, bias=False)
        self.peek = nn.Parameter(torch.zeros(heads))  # m_h
        self.value_scale = nn.Parameter(torch.zeros(heads))  # r_h: g_h = 10 r_h
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        k = self.keys(x)
        vx = self.value_proj(x).view(b, t, self.heads, d // self.heads)
        nxt = torch.cat([vx[:, 1:], torch.zeros_like(vx[:, :1])], dim=1)  # x_{T+1} = 0 at the end
        m = self.peek[:, None]
        v = torch.exp(10 * self.value_scale)[:, None] * F.normalize((1 - m) * nxt + m * vx, dim=-1)
        ys = [torch.zeros_like(k[:, 0])]  # y_0 = 0: no earlier pair
        for i in range(1, t):
            scores = torch.einsum("bhd,bshd->bhs", k[:, i], k[:, :i])
            ys.append(torch.einsum("bhs,bshd->bhd", torch.softmax(scores, dim=-1), v[:, :i]))
        return self.c_proj(torch.stack(ys, dim=1).reshape(b, t, d))


class PersistentMemory(nn.Module):
    def __init__(self, d, heads, p):
        super().__init__()
        self.keys = LeakyKeys(d, heads)
        self.bank_keys = nn.Parameter(torch.zeros(heads, p, d // heads))
        self.bank_values = nn.Parameter(torch.zeros(heads, p, d // heads))
        self.out_scale = nn.Parameter(torch.zeros(heads))
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        k = self.keys(x)
        weights = torch.softmax(torch.einsum("bthd,hpd->bthp", k, self.bank_keys), dim=-1)
        y = torch.exp(10 * self.out_scale)[:, None] * torch.einsum("bthp,hpd->bthd", weights, self.bank_values)
        return self.c_proj(y.reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d, heads, p, eps):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, eps=eps, bias=False)
        self.ctx = ContextMemory(d, heads)
        self.ln_2 = nn.LayerNorm(d, eps=eps, bias=False)
        self.pmem = PersistentMemory(d, heads, p)

    def forward(self, x):
        x = x + self.ctx(self.ln_1(x))
        return x + self.pmem(self.ln_2(x))


class GatedKeys(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.key_proj = nn.Linear(d, d, bias=False)
        self.gain_proj = nn.Linear(d, heads, bias=False)  # g_t = exp(w_g · x_t)
        self.decay_proj = nn.Linear(d, heads, bias=False)  # λ_t = exp(-|w_λ · x_t|)

    def forward(self, x):  # x [B, T, d] -> unit keys [B, T, H, hs]
        b, t, d = x.shape
        phi = self.key_proj(x).view(b, t, self.heads, d // self.heads)
        gain, keep = torch.exp(self.gain_proj(x)), torch.exp(-self.decay_proj(x).abs())
        kbar, out = torch.zeros_like(phi[:, 0]), []
        for i in range(t):
            kbar = gain[:, i, :, None] * phi[:, i] + keep[:, i, :, None] * kbar
            out.append(kbar)
        return F.normalize(torch.stack(out, dim=1), dim=-1)


class MemoryV2(nn.Module):
    """Short-term (pairs 1 <= T - t <= window) or long-term (pairs T - t >= gap) memory."""

    def __init__(self, d, heads, gap, window):
        super().__init__()
        self.heads, self.gap, self.window = heads, gap, window
        self.keys = GatedKeys(d, heads)
        self.value_proj = nn.Linear(d, d, bias=False)
        self.peek = nn.Parameter(torch.zeros(heads))
        self.value_scale = nn.Parameter(torch.zeros(heads))
        self.bandwidth_base = nn.Parameter(torch.zeros(heads))  # β0 = softplus(.)
        self.bandwidth_scale = nn.Parameter(torch.zeros(heads))  # β1 = softplus(.)
        self.bandwidth_exponent = nn.Parameter(torch.zeros(heads))  # α = sigmoid(.)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, gap=None):
        gap = self.gap if gap is None else gap
        b, t, d = x.shape
        k = self.keys(x)
        vx = self.value_proj(x).view(b, t, self.heads, d // self.heads)
        nxt = torch.cat([vx[:, 1:], torch.zeros_like(vx[:, :1])], dim=1)
        m = self.peek[:, None]
        v = torch.exp(10 * self.value_scale)[:, None] * F.normalize((1 - m) * nxt + m * vx, dim=-1)
        ys = []
        for i in range(t):
            seen = [j for j in range(i) if i - j >= gap and (self.window is None or i - j <= self.window)]
            if not seen:
                ys.append(torch.zeros_like(k[:, 0]))
                continue
            n = len(seen)
            beta = (F.softplus(self.bandwidth_scale) * n ** torch.sigmoid(self.bandwidth_exponent)
                    + F.softplus(self.bandwidth_base))[:, None]  # [H, 1]
            scores = beta * torch.einsum("bhd,bshd->bhs", k[:, i], k[:, seen])
            ys.append(torch.einsum("bhs,bshd->bhd", torch.softmax(scores, dim=-1), v[:, seen]))
        return self.c_proj(torch.stack(ys, dim=1).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BlockV2(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, heads, eps = config.hidden_size, config.num_attention_heads, config.layer_norm_eps
        self.ln_1 = nn.LayerNorm(d, eps=eps, bias=False)
        self.short = MemoryV2(d, heads, 1, config.short_window)
        self.long = MemoryV2(d, heads, config.long_gap_min, None)
        self.ln_2 = nn.LayerNorm(d, eps=eps, bias=False)
        self.ffn = SwiGLU(d, config.ffn_size)

    def forward(self, x, long_gap=None):
        h = self.ln_1(x)
        x = x + self.short(h) + self.long(h, long_gap)
        return x + self.ffn(self.ln_2(x))


class TorchMosaics(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.d, self.version = d, config.version
        self.embed = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList(
            (Block(d, config.num_attention_heads, config.pmem_size, config.layer_norm_eps)
             if config.version == 1 else BlockV2(config))
            for _ in range(config.num_hidden_layers)
        )
        self.ln_f = nn.LayerNorm(d, eps=config.layer_norm_eps, bias=False)

    def forward(self, tokens, long_gap=None):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x) if self.version == 1 else block(x, long_gap)
        return self.ln_f(x) @ self.embed.weight.T / math.sqrt(self.d)  # tied, scaled by 1/√d


def _torch_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """pigjax parameter path (without the layer index) -> (torch name, whether to transpose)."""
    if path[-1] == "kernel":  # flax Dense kernel [in, out] = torch Linear weight [out, in] transposed
        return ".".join(path[:-1]) + ".weight", True
    if path[-1] == "scale":  # LayerNorm
        return ".".join(path[:-1]) + ".weight", False
    if path == ("embed", "embedding"):
        return "embed.weight", False
    return ".".join(path), False


def _jax_leaves(params):
    import jax

    for keypath, leaf in jax.tree.leaves_with_path(params):
        yield tuple(k.key for k in keypath), np.asarray(leaf)


def from_jax(params, config, dtype=torch.float64) -> TorchMosaics:
    model = TorchMosaics(config).to(dtype)
    state = dict(model.named_parameters())
    seen = set()
    with torch.no_grad():
        for path, leaf in _jax_leaves(params):
            stacked = path[0] == "layers"
            for i in range(config.num_hidden_layers if stacked else 1):
                name, transpose = _torch_name(path[1:] if stacked else path)
                name = f"blocks.{i}.{name}" if stacked else name
                value = torch.tensor(leaf[i] if stacked else leaf)
                state[name].copy_(value.T if transpose else value)
                seen.add(name)
    missing = set(state) - seen
    assert not missing, f"parameters not loaded from JAX: {sorted(missing)}"
    return model


def grads_as_jax(model: TorchMosaics, params, config):
    """The .grad of every torch parameter, in the pigjax tree layout (as numpy arrays)."""
    import jax

    state = dict(model.named_parameters())

    def grad_of(keypath, leaf):
        path = tuple(k.key for k in keypath)
        if path[0] != "layers":
            name, transpose = _torch_name(path)
            g = state[name].grad
            return (g.T if transpose else g).numpy()
        name, transpose = _torch_name(path[1:])
        gs = [state[f"blocks.{i}.{name}"].grad for i in range(config.num_hidden_layers)]
        return np.stack([(g.T if transpose else g).numpy() for g in gs])

    return jax.tree_util.tree_map_with_path(grad_of, params)
