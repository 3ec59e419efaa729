// The store calls pigjax._engine exports to other native modules (the CUDA handlers,
// cuda_handlers.cc). Stores live in one process-wide registry inside pigjax._engine
// (docs/algorithm.md §6); a second module linking its own copy of the kernels would have a second,
// empty registry. So pigjax._engine hands out this table as a PyCapsule named kEngineApiName
// (module.cc, engine_api()), and the CUDA module calls the engine through it. Both modules are
// built from the same sources by the same CMake build; struct_size and version guard a mix-up.
#pragma once

#include <cstdint>
#include <string>

#include "store_args.h"

namespace pigjax {

struct StoreOps {
  std::string (*prefill)(int64_t handle, const PrefillArgs& args);
  std::string (*append)(int64_t handle, const AppendArgs& args);
  std::string (*query)(int64_t handle, const QueryArgs& args);
  std::string (*query_ranked)(int64_t handle, const RankedQueryArgs& args);
  // store.h, store_prefill_background
  std::string (*prefill_background)(int64_t handle, const PrefillArgs& args,
                                    void (*done)(void* ctx, const char* message), void* ctx);
};

constexpr uint32_t kEngineApiVersion = 3;
constexpr const char* kEngineApiName = "pigjax.EngineApi";

struct EngineApi {
  uint32_t struct_size;  // sizeof(EngineApi) of the exporting module
  uint32_t version;      // kEngineApiVersion of the exporting module
  StoreOps ops;
};

}  // namespace pigjax
