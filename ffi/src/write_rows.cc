// See write_rows.h.
#include "write_rows.h"

#include <cstring>

#include "shape_text.h"

namespace pigjax {

std::string plan_write_rows(const std::vector<int64_t>& buf, const std::vector<int64_t>& rows,
                            const std::vector<int64_t>& starts, const std::vector<int64_t>& out,
                            WriteRowsShape* s) {
  if (buf.size() != 4) return "buf must be [B, H, S, d], got " + shape_text(buf);
  if (rows.size() != 4) return "rows must be [B, T, H, d], got " + shape_text(rows);
  if (rows[0] != buf[0] || rows[2] != buf[1] || rows[3] != buf[3])
    return "rows " + shape_text(rows) + " do not fit buf " + shape_text(buf) + " ([B, T, H, d] and [B, H, S, d])";
  if (starts.size() != 1 || starts[0] != buf[0]) return "starts must be [B] = [" + std::to_string(buf[0]) +
                                                       "], got " + shape_text(starts);
  if (out != buf) return "out must have buf's shape " + shape_text(buf) + ", got " + shape_text(out);
  *s = {buf[0], rows[1], buf[1], buf[2], buf[3]};
  return "";
}

void write_rows(const WriteRowsShape& s, size_t elsize, const void* buf, const void* rows,
                const int32_t* starts, void* out) {
  char* o = static_cast<char*>(out);
  if (out != buf) std::memcpy(o, buf, static_cast<size_t>(s.B * s.H * s.S * s.d) * elsize);
  const char* r = static_cast<const char*>(rows);
  const size_t row = static_cast<size_t>(s.d) * elsize;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t t = 0; t < s.T; ++t) {
      const int64_t slot = int64_t{starts[b]} + t;
      if (slot < 0 || slot >= s.S) continue;
      for (int64_t h = 0; h < s.H; ++h)
        std::memcpy(o + static_cast<size_t>((b * s.H + h) * s.S + slot) * row,
                    r + static_cast<size_t>((b * s.T + t) * s.H + h) * row, row);
    }
}

}  // namespace pigjax
