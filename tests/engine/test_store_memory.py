"""The store's memory: table layouts (direct / compact, identical results), the byte estimate against
what a store allocates, the memory limit, and argument checking."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pigjax import PigjaxError
from pigjax.attention import lsh_attention, lsh_estimator as estimator
from pigjax.attention import reference as ref
from pigjax.engine import Store, estimate_bytes, memory_limit, native

_engine = native._engine


@pytest.fixture
def table_layout():
    """set_table_layout(mode) for the test, restored after it."""
    old = _engine.get_table_layout()
    yield _engine.set_table_layout
    _engine.set_table_layout(old)


def _near_inputs(seed, K, L, b=2, hq=6, hkv=2, n=600, d=32, near=12):
    """Random keys plus, for each query head, `near` keys close to it (cos ~ 0.97), so that even
    at K = 16 the sample is neither empty nor everything."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, hq, d)).astype(np.float32)
    k = (rng.normal(size=(b, hkv, n, d)) + 2.0 * rng.normal(size=(1, 1, 1, d))).astype(np.float32)
    g = hq // hkv
    for r in range(b):
        for h in range(hq):
            pos = rng.choice(np.arange(4, n - 64), near, replace=False)
            k[r, h // g, pos] = 3 * q[r, h] + 0.25 * rng.normal(size=(near, d))
    v = rng.normal(size=(b, hkv, n, d)).astype(np.float32)
    proj = rng.normal(size=(d, K * L)).astype(np.float32)
    return q, k, v, proj


def _compact(K, length):
    """The directory bits the engine picks for a block of `length` tokens (K: direct)."""
    bits = min(K - 1, max(0, math.ceil(math.log2(length)) - 1)) if length > 1 else 0
    direct = 4 * (2**K + 1) + 2 * length
    return bits if 2 * (4 * (2**bits + 1) + 4 * length) < direct else K


@pytest.mark.parametrize("K, L, n, layout", [(16, 64, 600, "compact"), (12, 40, 900, "compact"),
                                             (10, 150, 3000, "direct"), (10, 40, 700, "direct")])
def test_layouts_give_identical_results_and_match_reference(table_layout, K, L, n, layout):
    """Compact tables (a bucket directory over the code's top bits, entries filtered by code) and
    direct ones (2^K + 1 offsets per table) sample the same sets and give bit-identical outputs,
    equal to the NumPy reference; the automatic choice is the expected one."""
    sink, local = 4, 64
    q, k, v, proj = _near_inputs(K * 100 + L, K, L, n=n)
    lengths = np.array([n, n - 150], np.int32)
    results = {}
    for mode in (-1, 0, 1):
        table_layout(mode)
        out, sampled = lsh_attention(q, k, v, proj, K=K, L=L, sink=sink, local=local, lengths=lengths,
                                     storage="f32")
        results[mode] = (np.asarray(out), np.asarray(sampled))
    for mode in (0, 1):
        np.testing.assert_array_equal(results[mode][1], results[-1][1])
        np.testing.assert_array_equal(results[mode][0], results[-1][0])  # bit-identical
    out, sampled = results[-1]
    kc, k_codes, q_codes = (np.asarray(a) for a in estimator._prepare(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths), jnp.asarray(proj), K=K, sink=sink, local=local))
    for r in range(2):
        exact, middle = ref.split(int(lengths[r]), sink, local)
        o_g, lse_g = ref.exact_attention(q[r], kc[r], v[r], exact)
        o_s, lse_s, count, _ = ref.sampled_attention(q[r], kc[r][:, middle], v[r][:, middle],
                                                     k_codes[r][:, middle], q_codes[r], K, L)
        np.testing.assert_array_equal(sampled[r], count)
        assert 0 < count.min() and count.max() < len(middle)
        expected = ref.merge(o_g, lse_g, o_s, lse_s)
        assert np.abs(out[r] - expected).max() / np.abs(expected).max() < 1e-5
    # The layout the engine picks by itself, and what it allocates.
    table_layout(-1)
    m = n - sink - local
    with Store(1, 2, 32, m, K, L, storage="f32") as store:
        store.prefill(jnp.zeros((1,), jnp.int32), jnp.asarray(k[:1]), jnp.asarray(v[:1]), jnp.asarray(k_codes[:1]),
                      jnp.asarray(lengths[:1]), sink=sink, local=local)
        info = store.info()
    assert info["table_bits"] == [[_compact(K, m)]]
    assert (info["table_bits"][0][0] < K) == (layout == "compact")
    detail = _engine.store_estimate_bytes(1, 2, 32, m, K, L, "f32")
    assert info["bytes_allocated"] == 2 * detail["prefill_per_slot_head"]
    assert estimate_bytes(1, 2, 32, m, K, L, "f32") == 2 * max(detail["prefill_per_slot_head"],
                                                               detail["append_per_slot_head"])
    assert estimate_bytes(1, 2, 32, m, K, L, "f32", appends=False) == info["bytes_allocated"]


def test_k16_l512_one_600_token_row_bytes():
    """The case of the issue: one 600-token row at K = 16, L = 512 took 512 x 65537 int32 offsets per
    KV head (405 MB for 3 KV heads at d = 64); compact tables take 2.4 MB per KV head."""
    K, L, hkv, d, n = 16, 512, 3, 64, 600
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.normal(size=(1, hkv, n, d)), jnp.float32)
    codes = jnp.asarray(rng.integers(0, 2**K, size=(1, hkv, n, L)), jnp.int32)
    with Store(1, hkv, d, n, K, L, appends=False) as store:
        store.prefill(jnp.zeros((1,), jnp.int32), k, k, codes, jnp.asarray([n], jnp.int32), sink=0, local=0)
        info = store.info()
    assert info["table_bits"] == [[9]]
    assert info["bytes_allocated"] == estimate_bytes(1, hkv, d, n, K, L, appends=False) == 7_306_272
    assert info["bytes_allocated"] < 405e6 / 50


@pytest.mark.parametrize("slots, hkv, d, capacity, K, L, storage", [
    (3, 2, 16, 500, 10, 150, "bf16"),   # direct
    (2, 1, 24, 300, 14, 30, "f32"),     # compact
    (1, 1, 4, 70000, 4, 3, "bf16"),     # two blocks
    (1, 1, 4, 66000, 16, 4, "f32"),     # a direct full block and a compact one
])
def test_estimate_equals_bytes_of_a_full_store(slots, hkv, d, capacity, K, L, storage):
    rng = np.random.default_rng(1)
    keys = jnp.asarray(rng.normal(size=(slots, hkv, capacity, d)), jnp.float32)
    codes = jnp.asarray(rng.integers(0, 2**K, size=(slots, hkv, capacity, L)), jnp.int32)
    est = estimate_bytes(slots, hkv, d, capacity, K, L, storage, appends=False)
    detail = _engine.store_estimate_bytes(slots, hkv, d, capacity, K, L, storage)
    assert est == slots * hkv * detail["prefill_per_slot_head"]
    assert estimate_bytes(slots, hkv, d, capacity, K, L, storage) == detail["bytes"] == slots * hkv * max(
        detail["prefill_per_slot_head"], detail["append_per_slot_head"])
    with Store(slots, hkv, d, capacity, K, L, storage=storage, appends=False) as store:
        store.prefill(jnp.arange(slots, dtype=jnp.int32), keys, keys, codes,
                      jnp.full((slots,), capacity, jnp.int32), sink=0, local=0)
        assert store.info()["bytes_allocated"] == est


def test_append_buffer_stays_within_the_estimate():
    """Appends grow their buffer by doubling, but never past the slot's room (capacity - middle)."""
    K, L, d, capacity = 6, 40, 16, 300
    rng = np.random.default_rng(2)
    k = jnp.asarray(rng.normal(size=(1, 1, capacity, d)), jnp.float32)
    codes = jnp.asarray(rng.integers(0, 2**K, size=(1, 1, capacity, L)), jnp.int32)
    detail = _engine.store_estimate_bytes(1, 1, d, capacity, K, L, "bf16")
    assert detail["append_per_slot_head"] > detail["prefill_per_slot_head"]  # 4·L code bytes per token
    with Store(1, 1, d, capacity, K, L) as store:
        slots = jnp.zeros((1,), jnp.int32)
        dep = store.prefill(slots, k[:, :, :1], k[:, :, :1], codes[:, :, :1], jnp.asarray([1], jnp.int32),
                            sink=0, local=1)  # an empty middle: the whole capacity is room
        t = 0
        for step in (1, 2, 5, 20, 70, 150, 52):
            dep = store.append(slots, k[:, :, t:t + step], k[:, :, t:t + step], codes[:, :, t:t + step],
                               jnp.asarray([step], jnp.int32), dep)
            t += step
        assert int(dep[0]) == t == capacity
        assert store.info()["bytes_allocated"] == detail["append_per_slot_head"] == estimate_bytes(
            1, 1, d, capacity, K, L)
    with Store(1, 1, d, capacity, K, L, appends=False) as store:
        slots = jnp.zeros((1,), jnp.int32)
        dep = store.prefill(slots, k[:, :, :1], k[:, :, :1], codes[:, :, :1], jnp.asarray([1], jnp.int32),
                            sink=0, local=1)
        with pytest.raises(Exception, match=r"created without appends \(appends=false\)"):
            jax.block_until_ready(store.append(slots, k[:, :, :5], k[:, :, :5], codes[:, :, :5],
                                               jnp.asarray([5], jnp.int32), dep))
        assert store.info()["appended_counts"] == [0] and store.info()["appends"] is False


def test_memory_limit(monkeypatch):
    args = (4, 3, 64, 8192, 16, 512)
    est = estimate_bytes(*args)
    monkeypatch.setenv("PIGJAX_ENGINE_MAX_BYTES", str(est))
    assert memory_limit() == est
    Store(*args).close()  # just fits
    monkeypatch.setenv("PIGJAX_ENGINE_MAX_BYTES", str(est - 1))
    with pytest.raises(PigjaxError, match=r"^Store: .*\(head_dim 64, bf16, appends\) needs ~"):
        Store(*args)
    est = estimate_bytes(*args, appends=False)
    assert est <= estimate_bytes(*args)  # equal here: at K = 16 a prefill takes more than appends
    monkeypatch.setenv("PIGJAX_ENGINE_MAX_BYTES", str(est))
    Store(*args, appends=False).close()
    monkeypatch.setenv("PIGJAX_ENGINE_MAX_BYTES", str(est - 1))
    with pytest.raises(PigjaxError, match=(
            rf"^Store: K=16, L=512 for 4 slots x 3 KV heads x 8192 tokens \(head_dim 64, bf16\) needs ~[\d.]+ [MG]B "
            rf"\({est} bytes, [\d.]+ [MG]B per slot and KV head\), more than the [\d.]+ [MG]B set by "
            rf"PIGJAX_ENGINE_MAX_BYTES={est - 1}$")):
        Store(*args, appends=False)
    monkeypatch.setenv("PIGJAX_ENGINE_MAX_BYTES", "2.5G")
    assert memory_limit() == 2_500_000_000
    monkeypatch.setenv("PIGJAX_ENGINE_MAX_BYTES", "unlimited")
    assert memory_limit() is None
    Store(4, 64, 256, 2**31 - 1, 16, 4096).close()  # nothing is allocated before a prefill
    for bad in ("lots", "-1", "0", "8X"):
        monkeypatch.setenv("PIGJAX_ENGINE_MAX_BYTES", bad)
        with pytest.raises(PigjaxError, match="PIGJAX_ENGINE_MAX_BYTES must be a positive number of bytes"):
            Store(*args)
        with pytest.raises(PigjaxError, match="PIGJAX_ENGINE_MAX_BYTES must be"):
            memory_limit()
    monkeypatch.delenv("PIGJAX_ENGINE_MAX_BYTES")
    assert memory_limit() > 0  # MemAvailable
    with pytest.raises(PigjaxError, match=r"K=16, L=4096 for 64 slots x 8 KV heads x 1048576 tokens .* needs ~.* "
                                          r"more than the .* this machine has available \(MemAvailable"):
        Store(64, 8, 128, 2**20, 16, 4096)


@pytest.mark.parametrize("kwargs, match", [
    (dict(slots=2.5), r"slots must be an integer, got float 2.5"),
    (dict(slots=True), r"slots must be an integer, got the bool True"),
    (dict(slots=-1), r"slots must be >= 1, got -1"),
    (dict(slots=0), r"slots must be >= 1, got 0"),
    (dict(slots=2**25), r"slots must be <= 2\^24"),
    (dict(kv_heads="3"), r"kv_heads must be an integer, got str '3'"),
    (dict(kv_heads=5000), r"kv_heads must be <= 4096"),
    (dict(head_dim=None), r"head_dim must be an integer, got NoneType"),
    (dict(head_dim=np.float32(8)), r"head_dim must be an integer"),
    (dict(head_dim=70000), r"head_dim must be <= 65536"),
    (dict(capacity=2**70), r"capacity = 1180591620717411303424 is too large"),
    (dict(capacity=2**40), r"capacity must be < 2\^31"),
    (dict(capacity=np.bool_(True)), r"capacity must be an integer, got the bool"),
    (dict(K=2.0), r"K must be an integer, got float"),
    (dict(K=0), r"K must be >= 1, got 0"),
    (dict(K=17), r"K must be in \[1, 16\], got 17"),
    (dict(L=1), r"L must be >= 2, got 1"),
    (dict(L=1.5), r"L must be an integer"),
    (dict(L=65537), r"L must be <= 65536, got 65537"),
    (dict(K=16, L=65536), r"K·L must be <= 65536 .*got K=16, L=65536 \(K·L = 1048576\)"),
    (dict(eps=float("nan")), r"eps must be a finite number > 0, got nan"),
    (dict(eps=0.0), r"eps must be a finite number > 0, got 0.0"),
    (dict(eps=-1e-4), r"eps must be a finite number > 0"),
    (dict(eps=float("inf")), r"eps must be a finite number > 0, got inf"),
    (dict(eps="1e-4"), r"eps must be a number > 0, got str"),
    (dict(eps=True), r"eps must be a number > 0, got bool"),
    (dict(storage=3), r"storage must be 'f32' or 'bf16', got 3"),
    (dict(storage="f16"), r"storage must be 'f32' or 'bf16', got 'f16'"),
    (dict(path=3), r"path must be 'ffi', 'cuda-ffi', 'cuda-async', 'callback' or None, got 3"),
    (dict(path="gpu"), r"path must be 'ffi', 'cuda-ffi', 'cuda-async', 'callback' or None, got 'gpu'"),
    (dict(appends="no"), r"appends must be True or False, got str 'no'"),
    (dict(appends=1), r"appends must be True or False, got int 1"),
])
def test_bad_store_arguments_raise_pigjax_errors(kwargs, match):
    args = dict(slots=2, kv_heads=2, head_dim=8, capacity=10, K=4, L=8, eps=1e-4, storage="bf16")
    with pytest.raises(PigjaxError, match=f"^Store: {match}"):
        Store(**{**args, **kwargs})
    est = {key: value for key, value in {**args, **kwargs}.items() if key not in ("eps", "path")}
    if est != {key: value for key, value in args.items() if key != "eps"}:  # estimate_bytes checks the same
        with pytest.raises(PigjaxError, match=f"^estimate_bytes: {match}"):
            estimate_bytes(**est)


def test_numpy_integers_are_sizes():
    with Store(np.int64(2), np.int32(2), np.int16(8), np.uint32(10), np.int8(4), np.int64(8), np.float32(1e-3)) as s:
        assert s.info()["slots"] == 2
    assert estimate_bytes(np.int64(2), 2, 8, 10, 4, 8) == estimate_bytes(2, 2, 8, 10, 4, 8)
