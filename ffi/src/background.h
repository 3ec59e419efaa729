// The engine's background thread: runs queued tasks one at a time, in the order they were queued.
// It builds the tables of the non-blocking prefill (store.h, store_prefill_background) while the
// caller goes on; the build itself still spreads over the worker pool (thread_pool.h).
// Pure C++17: no XLA, no Python.
#pragma once

#include <functional>

namespace pigjax {

// Queues task (which must not throw) to run on the background thread, started on first use.
// At process exit the queue is drained before the thread stops.
void run_in_background(std::function<void()> task);

// Test hook: while held, queued tasks wait (a test then sees a caller return before its task
// ran); releasing lets them run. Not for production use.
void hold_background(bool hold);

}  // namespace pigjax
