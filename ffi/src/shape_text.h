// Shapes in error messages, built with std::to_string only: iostreams (std::ostringstream) crashed
// the module when a GCC-13-built engine ran in a process whose libstdc++ came from elsewhere (seen
// on the GPU device machine: a segfault formatting the first shape error).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pigjax {

inline std::string shape_text(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

}  // namespace pigjax
