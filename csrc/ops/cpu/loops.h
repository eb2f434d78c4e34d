// Inner loops of the CPU kernels: fp32 accumulation over a row of fp16/bf16/fp32 values, written
// with 8 independent accumulators so that the compiler vectorises them without -ffast-math.
#pragma once

#include <cstdint>

namespace bus {
namespace cpu {

constexpr int kLanes = 8;

// sum_i a[i] * float(b[i])
template <typename T>
inline float dot_f32(const float* a, const T* b, int64_t n) {
  float acc[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * static_cast<float>(b[i + j]);
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += a[i] * static_cast<float>(b[i]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// acc[i] += w * float(b[i])
template <typename T>
inline void axpy_f32(float* acc, float w, const T* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<float>(b[i]);
}

// out[i] = T(w * a[i])
template <typename T>
inline void scale_store(T* out, float w, const float* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(w * a[i]);
}

template <typename T>
inline void to_f32(float* out, const T* in, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

}  // namespace cpu
}  // namespace bus
