// nanobind module pigjax._engine (layer 3): FFI capsules plus a few CPU queries.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "engine_api.h"
#include "background.h"
#include "ffi_handlers.h"
#include "query.h"
#include "query_ranked.h"
#include "simd.h"
#include "simhash.h"
#include "store.h"
#include "store_args.h"
#include "thread_pool.h"

namespace nb = nanobind;

namespace {

template <typename T>
using CArray = nb::ndarray<const T, nb::c_contig, nb::device::cpu>;

template <typename T>
std::vector<int64_t> shape_of(const CArray<T>& a) {
  std::vector<int64_t> s(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) s[i] = static_cast<int64_t>(a.shape(i));
  return s;
}

template <typename T>
pigjax::ArrayView<const T> view(const CArray<T>& a) {
  return {a.data(), shape_of(a)};
}

// Runs call() (which returns "" or a validation message) without the GIL; a message becomes a
// ValueError prefixed with the function's name.
template <typename Call>
void run(const char* name, Call&& call) {
  std::string err;
  {
    nb::gil_scoped_release release;
    err = call();
  }
  if (!err.empty()) throw nb::value_error((std::string(name) + ": " + err).c_str());
}

// A new C-contiguous NumPy array owning a heap buffer; *out views it.
template <typename T>
nb::ndarray<nb::numpy, T> new_array(const std::vector<int64_t>& shape,
                                    pigjax::ArrayView<T>* out) {
  size_t count = 1;
  std::vector<size_t> shp;
  for (int64_t d : shape) { count *= static_cast<size_t>(d); shp.push_back(static_cast<size_t>(d)); }
  T* buf = new T[count > 0 ? count : 1]();
  nb::capsule owner(buf, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  *out = {buf, shape};
  return nb::ndarray<nb::numpy, T>(buf, shp.size(), shp.data(), owner);
}

// A StoreConfig from store_create's / store_estimate_bytes's arguments; ValueError (prefixed
// with `name`) for K or L outside the int range the config holds, or an unknown storage.
pigjax::StoreConfig make_config(const char* name, int64_t slots, int64_t kv_heads, int64_t head_dim,
                                int64_t capacity, int64_t K, int64_t L, double eps,
                                const std::string& storage, bool appends, int64_t sketch_tables) {
  pigjax::StoreConfig c;
  c.appends = appends;
  c.sketch_tables = sketch_tables;
  c.slots = slots; c.kv_heads = kv_heads; c.head_dim = head_dim; c.capacity = capacity;
  const std::string pre = std::string(name) + ": ";
  if (K < 1 || K > pigjax::kLshMaxK)
    throw nb::value_error((pre + "K must be in [1, 16], got " + std::to_string(K)).c_str());
  if (L < 2) throw nb::value_error((pre + "L must be >= 2, got " + std::to_string(L)).c_str());
  if (L > pigjax::kLshMaxL)
    throw nb::value_error((pre + "L must be <= " + std::to_string(pigjax::kLshMaxL) + ", got " +
                           std::to_string(L)).c_str());
  c.K = static_cast<int>(K); c.L = static_cast<int>(L); c.eps = eps;
  if (!pigjax::parse_store_storage(storage, &c.storage))
    throw nb::value_error((pre + "storage must be 'f32' or 'bf16', got '" + storage + "'").c_str());
  return c;
}

}  // namespace

NB_MODULE(_engine, m) {
  m.doc() = "pigjax native engine: XLA FFI handlers (CPU) and CPU feature queries";

  m.def("registrations", [] {
    nb::dict d;
    int n = 0;
    const pigjax::FfiTarget* t = pigjax::ffi_targets(&n);
    for (int i = 0; i < n; ++i)
      d[t[i].name] = nb::capsule(reinterpret_cast<void*>(t[i].handler));
    return d;
  }, "Dict: FFI target name -> PyCapsule of its XLA_FFI_Handler.");

  m.def("engine_api", [] {
    static const pigjax::EngineApi api = {
        sizeof(pigjax::EngineApi), pigjax::kEngineApiVersion,
        {pigjax::store_prefill, pigjax::store_append, pigjax::store_query,
         pigjax::store_query_ranked, pigjax::store_prefill_background}};
    return nb::capsule(&api, pigjax::kEngineApiName);
  }, "PyCapsule 'pigjax.EngineApi': the store calls (engine_api.h) for the CUDA handler module, "
     "which reaches this module's store registry through it.");

  m.def("simd_level", [] { return std::string(pigjax::simd_level_name(pigjax::simd_level())); },
        "SIMD level the kernels use now: 'avx512', 'avx2' or 'scalar'.");

  m.def("hardware_simd_level",
        [] { return std::string(pigjax::simd_level_name(pigjax::hardware_simd_level())); },
        "Best SIMD level this CPU supports.");

  m.def("set_simd_level", [](const std::string& name) {
    pigjax::SimdLevel level;
    if (!pigjax::parse_simd_level(name.c_str(), &level))
      throw nb::value_error("simd level must be 'scalar', 'avx2' or 'avx512'");
    return std::string(pigjax::simd_level_name(pigjax::set_simd_level(level)));
  }, nb::arg("level"),
     "Force a SIMD level (clamped to the hardware's) for tests/benchmarks; returns the "
     "effective level. Process-wide.");

  m.def("cpu_features", [] {
    const pigjax::CpuFeatures& f = pigjax::cpu_features();
    nb::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl;
    d["avx512_bf16"] = f.avx512_bf16;
    d["avx512_vpopcntdq"] = f.avx512_vpopcntdq;
    return d;
  }, "Dict of CPU feature flags (as usable by this process).");

  m.def("num_threads", [] { return pigjax::default_num_threads(); },
        "Default worker count: PIGJAX_NUM_THREADS, else hardware_concurrency().");

  m.def("simhash_codes_np", [](CArray<float> x, CArray<float> proj, int64_t K,
                              const std::string& kernel) {
    if (kernel != "blocked" && kernel != "legacy")
      throw nb::value_error("simhash_codes_np: kernel must be 'blocked' or 'legacy'");
    const std::vector<int64_t> xs = shape_of(x), ps = shape_of(proj);
    std::vector<int64_t> out_shape(xs.begin(), xs.end());
    if (!out_shape.empty() && ps.size() == 2 && K > 0) out_shape.back() = ps[1] / K;
    pigjax::ArrayView<int32_t> out;
    auto result = new_array<int32_t>(out_shape, &out);
    run("simhash_codes_np", [&]() -> std::string {
      if (ps.size() != 2) return "proj must have shape [d, K*L] (rank 2)";
      pigjax::SimhashPlan plan;
      std::string err = pigjax::plan_simhash(xs, ps, out_shape, K, &plan);
      if (!err.empty()) return err;
      if (kernel == "legacy")
        pigjax::simhash_codes_legacy_at(pigjax::simd_level(), x.data(), plan.rows, plan.d,
                                        proj.data(), plan.K, plan.L, out.data);
      else
        pigjax::simhash_codes_planned(plan, x.data(), proj.data(), out.data);
      return std::string();
    });
    return result;
  }, nb::arg("x"), nb::arg("proj"), nb::arg("K"), nb::arg("kernel") = "blocked",
     "SimHash codes of NumPy arrays x [..., d], proj [d, K*L] (float32, C-contiguous) -> int32 "
     "[..., L]. kernel='blocked' (the FFI handler's: multi-threaded) or 'legacy' (the "
     "single-thread kernel of commit 4ac4b4a), at simd_level(). For benchmarks and tests.");

  // ---- LSH KV store (store.h, query.h) and its thread pool (thread_pool.h) ----
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw nb::value_error("set_num_threads: n must be >= 1");
    pigjax::set_num_threads(n);
  }, nb::arg("n"), "Resize the LSH store's worker pool (total parallelism, caller included).");
  m.def("get_num_threads", [] { return pigjax::get_num_threads(); },
        "Current size of the LSH store's worker pool.");

  m.def("set_query_split", [](int mode) {
    if (mode < -1 || mode > 2)
      throw nb::value_error(("set_query_split: mode must be -1, 0, 1 or 2, got " + std::to_string(mode)).c_str());
    pigjax::set_query_split(mode);
  }, nb::arg("mode"),
        "The query's parallel shape: -1 auto (default), 0 one task per (row, KV head), 1 split "
        "within a KV head, 2 tasks per (row, KV head, part of its query heads). Process-wide; "
        "for tests/benchmarks.");
  m.def("get_query_split", [] { return pigjax::get_query_split(); }, "See set_query_split.");

  m.def("set_table_layout", [](int mode) { pigjax::set_table_layout(mode); }, nb::arg("mode"),
        "Table layout of later prefills: -1 auto (default: compact when 2^K exceeds a block's "
        "token count), 0 always direct (2^K + 1 offsets per table), 1 always compact. "
        "Process-wide; for tests/benchmarks (results are identical).");
  m.def("get_table_layout", [] { return pigjax::get_table_layout(); }, "See set_table_layout.");

  m.def("store_create", [](int64_t slots, int64_t kv_heads, int64_t head_dim, int64_t capacity,
                           int64_t K, int64_t L, double eps, const std::string& storage, bool appends,
                           int64_t sketch_tables) {
    const pigjax::StoreConfig c = make_config("store_create", slots, kv_heads, head_dim, capacity, K, L, eps,
                                              storage, appends, sketch_tables);
    std::string err;
    const int64_t h = pigjax::store_create(c, &err);
    if (h == 0) throw nb::value_error(("store_create: " + err).c_str());
    return h;
  }, nb::arg("slots"), nb::arg("kv_heads"), nb::arg("head_dim"), nb::arg("capacity"),
     nb::arg("K"), nb::arg("L"), nb::arg("eps") = 1e-4, nb::arg("storage") = "bf16",
     nb::arg("appends") = true, nb::arg("sketch_tables") = 0,
     "Create an LSH KV store; returns an integer handle (never reused). Storage is allocated "
     "lazily at prefill, sized to the middle count. appends=False: appending is an error and "
     "the memory estimate counts prefills only. sketch_tables > 0: the codes of tables "
     "[0, sketch_tables) are also kept per token for ranked queries (sketch.h). ValueError for a bad setting, or when "
     "store_estimate_bytes exceeds store_memory_limit().");

  m.def("store_estimate_bytes", [](int64_t slots, int64_t kv_heads, int64_t head_dim,
                                   int64_t capacity, int64_t K, int64_t L, const std::string& storage,
                                   bool appends, int64_t sketch_tables) {
    const pigjax::StoreConfig c = make_config("store_estimate_bytes", slots, kv_heads, head_dim,
                                              capacity, K, L, 1e-4, storage, appends, sketch_tables);
    pigjax::StoreEstimate e;
    const std::string err = pigjax::estimate_store_bytes(c, &e);
    if (!err.empty()) throw nb::value_error(("store_estimate_bytes: " + err).c_str());
    nb::dict d;
    d["bytes"] = e.bytes;
    d["per_slot_head"] = e.per_slot_head;
    d["prefill_per_slot_head"] = e.prefill_per_slot_head;
    d["append_per_slot_head"] = e.append_per_slot_head;
    return d;
  }, nb::arg("slots"), nb::arg("kv_heads"), nb::arg("head_dim"), nb::arg("capacity"), nb::arg("K"),
     nb::arg("L"), nb::arg("storage") = "bf16", nb::arg("appends") = true, nb::arg("sketch_tables") = 0,
     "Dict: the bytes a store with this config allocates with every slot full (bytes), per "
     "(slot, KV head) (per_slot_head: prefill_per_slot_head, `capacity` middle tokens, or with "
     "appends the larger of that and append_per_slot_head, `capacity` appended tokens). "
     "ValueError for a bad setting.");

  m.def("store_memory_limit", [] {
    int64_t bytes = -1;
    std::string source;
    const std::string err = pigjax::store_memory_limit(&bytes, &source);
    if (!err.empty()) throw nb::value_error(("store_memory_limit: " + err).c_str());
    return std::make_tuple(bytes < 0 ? nb::none() : nb::object(nb::int_(bytes)), source);
  }, "(bytes or None, description): the limit store_create checks estimates against: "
     "PIGJAX_ENGINE_MAX_BYTES, else MemAvailable (read now), else None.");

  m.def("store_free", [](int64_t handle) {
    std::string err;
    if (!pigjax::store_free(handle, &err)) throw nb::value_error(("store_free: " + err).c_str());
  }, nb::arg("handle"), "Free a store (ValueError for an unknown or already freed handle).");

  m.def("store_pending_builds", [](int64_t handle) {
    std::string err;
    const int n = pigjax::store_pending_builds(handle, &err);
    if (n < 0) throw nb::value_error(("store_pending_builds: " + err).c_str());
    return n;
  }, nb::arg("handle"),
     "Background prefills of the store (the cuda-async path's) whose tables are not built yet.");

  m.def("store_wait_builds", [](int64_t handle) {
    std::string err;
    nb::gil_scoped_release release;
    return pigjax::store_wait_builds(handle, &err);
  }, nb::arg("handle"),
     "Wait until the store's background prefills are built; False for an unknown or freed handle.");

  m.def("hold_background", [](bool hold) { pigjax::hold_background(hold); }, nb::arg("hold"),
        "Test hook: while held, background table builds wait (see ffi/src/background.h).");

  m.def("store_info", [](int64_t handle) {
    pigjax::StoreInfo info;
    std::string err;
    if (!pigjax::store_info(handle, &info, &err)) throw nb::value_error(("store_info: " + err).c_str());
    const pigjax::StoreConfig& c = info.config;
    nb::dict d;
    d["slots"] = c.slots; d["kv_heads"] = c.kv_heads; d["head_dim"] = c.head_dim;
    d["capacity"] = c.capacity; d["K"] = c.K; d["L"] = c.L; d["eps"] = c.eps;
    d["storage"] = std::string(pigjax::store_storage_name(c.storage));
    d["appends"] = c.appends;
    d["sketch_tables"] = c.sketch_tables;
    nb::dict bpt;
    for (const auto& kv : info.bytes_per_token) bpt[kv.first.c_str()] = kv.second;
    d["bytes_per_token"] = bpt;
    nb::list counts, appended, pre;
    for (size_t i = 0; i < info.middle_counts.size(); ++i) {
      counts.append(info.middle_counts[i]);
      appended.append(info.appended_counts[i]);
      pre.append(bool(info.prefilled[i]));
    }
    d["middle_counts"] = counts;
    d["appended_counts"] = appended;
    d["bytes_per_appended_token"] = info.bytes_per_appended_token;
    d["prefilled"] = pre;
    nb::list bits;
    for (const std::vector<int>& b : info.table_bits) {
      nb::list row;
      for (int x : b) row.append(x);
      bits.append(row);
    }
    d["table_bits"] = bits;
    d["bytes_allocated"] = info.bytes_allocated;
    d["block_tokens"] = pigjax::kBlockTokens;
    return d;
  }, nb::arg("handle"), "Dict: config, bytes_per_token per structure, middle and appended "
     "counts per slot, table_bits per slot (directory bits of each block's tables: K direct, "
     "fewer compact), bytes_allocated.");

  // The outputs are allocated from the inputs' shapes when those have the right rank; otherwise
  // they stay empty views and the validation reports the input's shape.
  m.def("store_prefill_np", [](int64_t handle, CArray<int32_t> slots, CArray<float> keys,
                               CArray<float> values, CArray<int32_t> codes,
                               CArray<int32_t> lengths, int64_t sink, int64_t local) {
    pigjax::PrefillArgs a;
    a.slots = view(slots);
    a.keys = view(keys);
    a.values = view(values);
    a.codes = view(codes);
    a.lengths = view(lengths);
    a.sink = sink;
    a.local = local;
    nb::ndarray<nb::numpy, int32_t> middle;
    if (a.slots.dims.size() == 1) middle = new_array<int32_t>({a.slots.dims[0]}, &a.middle_counts);
    run("store_prefill_np", [&] { return pigjax::store_prefill(handle, a); });
    return middle;
  }, nb::arg("handle"), nb::arg("slots"), nb::arg("keys"), nb::arg("values"), nb::arg("codes"),
     nb::arg("lengths"), nb::arg("sink"), nb::arg("local"),
     "Direct (non-XLA) prefill with NumPy arrays (int32 / float32, C-contiguous); returns "
     "middle_counts int32[B]. Same C++ code as the pigjax_lsh_prefill FFI handler.");

  m.def("store_append_np", [](int64_t handle, CArray<int32_t> slots, CArray<float> keys,
                              CArray<float> values, CArray<int32_t> codes, CArray<int32_t> counts) {
    pigjax::AppendArgs a;
    a.slots = view(slots);
    a.keys = view(keys);
    a.values = view(values);
    a.codes = view(codes);
    a.counts = view(counts);
    nb::ndarray<nb::numpy, int32_t> totals;
    if (a.slots.dims.size() == 1) totals = new_array<int32_t>({a.slots.dims[0]}, &a.totals);
    run("store_append_np", [&] { return pigjax::store_append(handle, a); });
    return totals;
  }, nb::arg("handle"), nb::arg("slots"), nb::arg("keys"), nb::arg("values"), nb::arg("codes"),
     nb::arg("counts"),
     "Direct (non-XLA) append with NumPy arrays: the first counts[b] of T tokens of keys/values "
     "f32[B,Hkv,T,d] (centered), codes i32[B,Hkv,T,L] join the slot's append buffer; returns "
     "totals int32[B] (middle + appended). Same C++ code as the pigjax_lsh_append FFI handler.");

  m.def("store_query_np", [](int64_t handle, CArray<int32_t> slots, CArray<float> q,
                             CArray<int32_t> q_codes, double sample_cap) {
    pigjax::QueryArgs a;
    a.sample_cap = sample_cap;
    a.slots = view(slots);
    a.q = view(q);
    a.q_codes = view(q_codes);
    nb::ndarray<nb::numpy, float> out, lse;
    nb::ndarray<nb::numpy, int32_t> sampled;
    if (a.q.dims.size() == 3) {
      const int64_t B = a.q.dims[0], Hq = a.q.dims[1];
      out = new_array<float>(a.q.dims, &a.out);
      lse = new_array<float>({B, Hq}, &a.lse);
      sampled = new_array<int32_t>({B, Hq}, &a.sampled);
    }
    run("store_query_np", [&] { return pigjax::store_query(handle, a); });
    return std::make_tuple(out, lse, sampled);
  }, nb::arg("handle"), nb::arg("slots"), nb::arg("q"), nb::arg("q_codes"), nb::arg("sample_cap") = 1.0,
     "Direct (non-XLA) query with NumPy arrays; returns (out f32[B,Hq,d], lse f32[B,Hq], "
     "sampled i32[B,Hq]). Same C++ code as the pigjax_lsh_query FFI handler.");

  m.def("store_query_ranked_np", [](int64_t handle, CArray<int32_t> slots, CArray<float> q,
                                    CArray<int32_t> q_codes, int64_t rank_tables, double top,
                                    double refine, double sample_cap) {
    pigjax::RankedQueryArgs a;
    a.base.slots = view(slots);
    a.base.q = view(q);
    a.base.q_codes = view(q_codes);
    a.rank_tables = rank_tables;
    a.top = top;
    a.refine = refine;
    a.base.sample_cap = sample_cap;
    nb::ndarray<nb::numpy, float> out, lse;
    nb::ndarray<nb::numpy, int32_t> keys, values;
    if (a.base.q.dims.size() == 3) {
      const int64_t B = a.base.q.dims[0], Hq = a.base.q.dims[1];
      out = new_array<float>(a.base.q.dims, &a.base.out);
      lse = new_array<float>({B, Hq}, &a.base.lse);
      keys = new_array<int32_t>({B, Hq}, &a.base.sampled);
      values = new_array<int32_t>({B, Hq}, &a.values_read);
    }
    run("store_query_ranked_np", [&] { return pigjax::store_query_ranked(handle, a); });
    return std::make_tuple(out, lse, keys, values);
  }, nb::arg("handle"), nb::arg("slots"), nb::arg("q"), nb::arg("q_codes"), nb::arg("rank_tables"),
     nb::arg("top"), nb::arg("refine"), nb::arg("sample_cap") = 1.0,
     "Direct (non-XLA) ranked query (query_ranked.h) with NumPy arrays; returns (out f32[B,Hq,d], "
     "lse f32[B,Hq], keys_read i32[B,Hq], values_read i32[B,Hq]). Same C++ code as the "
     "pigjax_lsh_query_ranked FFI handler.");
}
