// The engine's worker threads: one persistent process-wide pool shared by all LSH stores
// (prefill, append and query split their work over it), and the default thread count.
// Pure C++17: no XLA, no Python.
#pragma once

#include <cstdint>
#include <functional>

namespace pigjax {

// Default worker count: PIGJAX_NUM_THREADS if it is a positive integer, else
// std::thread::hardware_concurrency() (at least 1).
int default_num_threads();

// Persistent worker pool shared by all stores. n >= 1 is the total parallelism (the calling
// thread works too, so n - 1 workers are spawned). Default: default_num_threads().
void set_num_threads(int n);
int get_num_threads();
// Runs fn(0..n-1) on the pool; the caller participates. Exceptions are rethrown (first one).
// Several threads may call it at once: each caller drains its own job, so a call never waits
// for a busy pool.
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

}  // namespace pigjax
