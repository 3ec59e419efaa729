// XLA FFI handlers for the CUDA platform: the LSH store's prefill, append, query and ranked query
// (blocking, and the query, ranked query and append also asynchronous) with operands and results
// in GPU memory (docs/gpu_engine.md; docs/algorithm.md §6). Plain C++ against the
// CUDA runtime API (cuda_runtime_api.h): no kernels. Built into pigjax._engine_cuda only where
// CMake finds the CUDA runtime (PIGJAX_CUDA, BUILD.md); built a second time against
// ffi/tests/fake_cuda/cuda_runtime_api.h (host memcpy, malloc) into the test-only module
// pigjax._engine_cuda_fake, registered for the CPU platform, so CPU tests run the same code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "engine_api.h"
#include "ffi_handlers.h"

namespace pigjax {
namespace cuda {

// Installs the engine's store calls (from pigjax._engine's engine_api capsule). The handlers
// return INTERNAL until this ran. Returns "" or the reason the table does not fit this build.
const char* set_engine_api(const EngineApi* api);

// Every handler this module exports (target names: see cuda_handlers.cc); *count = length.
const FfiTarget* cuda_ffi_targets(int* count);

// Pinned host bytes the staging buffers of all threads hold now.
int64_t staging_bytes();

// The first engine error of an asynchronous call (the pigjax_cuda_async_lsh_* targets) on store
// `handle` since the last take: moves it into *message and returns true, else false.
bool take_deferred_error(int64_t handle, std::string* message);

}  // namespace cuda
}  // namespace pigjax
