// Float32 scratch that the calling thread keeps from one call to the next, one buffer per use. Memory
// allocated afresh at tens of MB (a prefill chunk's expert rows) comes from the kernel page by page on every
// call, and at a decode step's few rows even a small torch allocation is a dispatch worth a good part of the
// product. A thread keeps its largest use of each buffer so far.
#pragma once

#include <cstdint>
#include <vector>

enum class Scratch { gemm_rows, gemm_sums, expert_rows, tile_rows, activation_rows, decode_partials, count };

inline float* scratch(Scratch use, int64_t floats) {
  thread_local std::vector<float> buffers[static_cast<int>(Scratch::count)];
  std::vector<float>& buffer = buffers[static_cast<int>(use)];
  if (buffer.size() < static_cast<size_t>(floats)) {
    std::vector<float>().swap(buffer);  // give back the old one before the new one is touched
    buffer.resize(floats);
  }
  return buffer.data();
}
