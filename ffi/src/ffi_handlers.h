// XLA FFI handlers (layer 2). Each handler validates its buffers, turns failures
// into ffi::Error (never aborts), and calls the kernels of layer 1.
#pragma once

#include "xla/ffi/api/c_api.h"

namespace pigjax {

struct FfiTarget {
  const char* name;       // name passed to jax.ffi.register_ffi_target / ffi_call
  XLA_FFI_Handler* handler;
};

// Every handler this module exports; *count receives the array length.
const FfiTarget* ffi_targets(int* count);

}  // namespace pigjax
