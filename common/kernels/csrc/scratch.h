// A thread's working memory, kept from one call to the next: float32 buffers, one per use (`scratch`), and
// the working sets of the attention kernels and others (`kept`). Memory allocated afresh at tens of MB (a
// prefill chunk's expert rows) comes from the kernel page by page on every call; at a decode step's few rows
// even a small torch allocation is a dispatch worth a good part of the product; and allocations made inside
// a parallel region come from every thread at once, out of the one arena a latentmoe process gives malloc
// (common/rpc/allocator.py), where they wait on each other: the paged decode of 64 sequences, which made
// its working set in each thread at every call, took 170 us a layer there against 110 with an arena per
// thread. A thread keeps its largest use of each buffer so far.
//
// All of it starts on a cache line (64 bytes), where malloc gives 16: AMX's tile loads and stores move rows
// of 64 bytes, and a row that straddles two lines costs two (a 64 x 512 x 768 product with its rows 16 bytes
// off a line, hot: 25 against 11 ns a tile multiply).
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

constexpr std::size_t CACHE_LINE = 64;

template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{CACHE_LINE}));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{CACHE_LINE}); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const {
    return true;
  }
};

// A std::vector whose elements start on a cache line.
template <typename T>
using LineVector = std::vector<T, LineAligned<T>>;

// `row`: a row of float32 inside a parallel region (the paged decode's combine, the experts' weighted sums,
// the sampler's weights).
enum class Scratch { gemm_rows, gemm_sums, expert_rows, tile_rows, activation_rows, decode_partials, row,
                     count };

// v holding at least n elements: grown (what it held kept), never shrunk.
template <typename V>
void grow(V& v, int64_t n) {
  if (v.size() < static_cast<size_t>(n)) v.resize(n);
}

// The calling thread's W, made once and kept: W grows its buffers to each call's needs itself.
template <typename W>
W& kept() {
  thread_local W w;
  return w;
}

inline float* scratch(Scratch use, int64_t floats) {
  thread_local LineVector<float> buffers[static_cast<int>(Scratch::count)];
  LineVector<float>& buffer = buffers[static_cast<int>(use)];
  if (buffer.size() < static_cast<size_t>(floats)) {
    LineVector<float>().swap(buffer);  // give back the old one before the new one is touched
    buffer.resize(floats);
  }
  return buffer.data();
}
