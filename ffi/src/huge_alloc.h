// HugeVector: std::vector whose large buffers are 2 MiB-aligned and marked MADV_HUGEPAGE. The
// store keeps every array a query reads at random in one (see BUILD.md, "LSH store memory").
#pragma once

#include <cstddef>
#include <cstdlib>
#include <limits>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pigjax {

// Allocator of the per-slot arrays a query reads at random (K/V rows, norms, table indices and
// offsets): allocations of >= 2 MiB are 2 MiB-aligned and marked MADV_HUGEPAGE, so with
// transparent huge pages in "madvise" mode (a common default) they get 2 MiB pages. With 4 KiB
// pages nearly every sampled row costs a TLB miss and a page walk. Only a hint: without THP
// the memory is ordinary.
template <typename T>
struct HugePageAllocator {
  using value_type = T;
  static constexpr size_t kHuge = size_t{1} << 21;
  HugePageAllocator() = default;
  template <typename U>
  HugePageAllocator(const HugePageAllocator<U>&) {}
  static size_t rounded(size_t n) { return (n * sizeof(T) + kHuge - 1) / kHuge * kHuge; }
  T* allocate(size_t n) {
    if (n > std::numeric_limits<size_t>::max() / sizeof(T) - kHuge) throw std::bad_alloc();
    if (n * sizeof(T) < kHuge) return static_cast<T*>(::operator new(n * sizeof(T)));
    void* p = std::aligned_alloc(kHuge, rounded(n));
    if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, rounded(n), MADV_HUGEPAGE);
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t n) {
    if (n * sizeof(T) < kHuge) ::operator delete(p);
    else std::free(p);
  }
  template <typename U>
  bool operator==(const HugePageAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const HugePageAllocator<U>&) const { return false; }
};
template <typename T>
using HugeVector = std::vector<T, HugePageAllocator<T>>;

}  // namespace pigjax
