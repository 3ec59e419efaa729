// The engine side of bench_query_ab.cc, compiled twice by bench_query_ab.sh: against an older
// engine's ffi/src (-Dpigjax=pigjax_old -DPFX=old_, so both engines link into one binary) and
// against this tree's (-DPFX=new_ -DNEW_ENGINE). Plain C entry points, so the harness needs
// neither engine's headers.
#include <string>
#include <vector>
#include "query.h"
#include "store.h"
#include "store_args.h"
#include "thread_pool.h"
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
using namespace pigjax;
extern "C" void CAT(PFX, threads)(int n) {
  set_num_threads(n);
}
// The table layout of later prefills (store.h, set_table_layout); the old engine may not have it.
extern "C" void CAT(PFX, table_layout)(int mode) {
#ifdef NEW_ENGINE
  set_table_layout(mode);
#else
  (void)mode;
#endif
}
extern "C" long long CAT(PFX, create_prefill)(long long B, long long Hkv, long long d, long long n, int K, int L,
                                               const float* keys, const float* vals, const int* codes) {
  StoreConfig cfg;
  cfg.slots = B; cfg.kv_heads = Hkv; cfg.head_dim = d; cfg.capacity = n; cfg.K = K; cfg.L = L;
  std::string err;
  const int64_t h = store_create(cfg, &err);
  if (h == 0) return 0;
  static std::vector<int32_t> slots, lengths, mc;
  slots.resize(B); lengths.assign(B, int32_t(n)); mc.resize(B);
  for (long long b = 0; b < B; ++b) slots[b] = int32_t(b);
  PrefillArgs p;
  p.slots = {slots.data(), {B}};
  p.keys = {keys, {B, Hkv, n, d}};
  p.values = {vals, {B, Hkv, n, d}};
  p.codes = {codes, {B, Hkv, n, (long long)L}};
  p.lengths = {lengths.data(), {B}};
  p.middle_counts = {mc.data(), {B}};
  if (!store_prefill(h, p).empty()) return 0;
  return h;
}
extern "C" int CAT(PFX, query)(long long h, long long B, long long Hq, long long d, int L, const float* q,
                                const int* qc, float* out, float* lse, int* sampled) {
  static std::vector<int32_t> slots;
  slots.resize(B);
  for (long long b = 0; b < B; ++b) slots[b] = int32_t(b);
  QueryArgs a;
  a.slots = {slots.data(), {B}};
  a.q = {q, {B, Hq, d}};
  a.q_codes = {qc, {B, Hq, (long long)L}};
  a.out = {out, {B, Hq, d}};
  a.lse = {lse, {B, Hq}};
  a.sampled = {sampled, {B, Hq}};
  return store_query(h, a).empty() ? 0 : 1;
}
