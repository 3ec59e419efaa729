// Writes a step's new K or V rows into a model-side cache buffer in place (docs/algorithm.md §4,
// "Cache writes on the CPU"). Pure C++17: no XLA, no Python.
//
// buf [B, H, S, d] <- new [B, T, H, d]: token t of row b goes to slot starts[b] + t of every head
// h; slots outside [0, S) are dropped (what `.at[...].set(mode="drop")` does). Elements are copied
// as bytes (elsize each), so any dtype works; XLA:CPU instead scatters a bf16 buffer by converting
// all of it to f32 and back.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pigjax {

struct WriteRowsShape {
  int64_t B = 0, T = 0, H = 0, S = 0, d = 0;
};

// "" when buf [B,H,S,d], new [B,T,H,d], starts [B] and out (= buf's shape) fit, else what is wrong.
std::string plan_write_rows(const std::vector<int64_t>& buf, const std::vector<int64_t>& rows,
                            const std::vector<int64_t>& starts, const std::vector<int64_t>& out,
                            WriteRowsShape* shape);

// Copies buf into out unless they are one buffer, then writes the rows into out.
void write_rows(const WriteRowsShape& shape, size_t elsize, const void* buf, const void* rows,
                const int32_t* starts, void* out);

}  // namespace pigjax
