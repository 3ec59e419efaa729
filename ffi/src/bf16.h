// bfloat16 <-> float32 conversion, for keys and values stored in bf16 (StoreStorage::kBF16) and
// for the AVX512_BF16 score pass. Inline, so that every kernel file can inline them (as it could
// when they shared one file with the kernels).
#pragma once

#include <cstdint>
#include <cstring>

namespace pigjax {

// Round to nearest even; NaN stays NaN (quiet, sign kept).
inline uint16_t f32_to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0)
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // quiet NaN, keep sign
  const uint32_t bias = 0x7fffu + ((bits >> 16) & 1u);      // round to nearest even
  return static_cast<uint16_t>((bits + bias) >> 16);
}

inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

// Element i of a stored row as float, for f32 or bf16 (uint16_t) storage.
inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }

}  // namespace pigjax
