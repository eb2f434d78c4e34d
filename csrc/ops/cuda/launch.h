// Raw-pointer launchers of the CUDA kernels (csrc/ops/cuda/*.cu), called from dispatch.cpp.
//
// This header includes no CUDA or ATen header: the .cu files compile without ATen (fast, and what
// `python -m bus_kernels.build --ptxas` compiles), and dispatch.cpp (host compiler) holds the
// at::Tensor side. Strides are in elements; every tensor has unit stride in its last dim.
#pragma once

#include <cstdint>

namespace bus {
namespace cuda {

enum class Dtype { kFloat32, kFloat16, kBFloat16 };

struct TopkGatherForwardArgs {
  const void* x;  // (B, N, C)
  int64_t stride_xb, stride_xn;
  const float* scores;         // (B, N) contiguous
  const int64_t* k;  // (B,); each row's segments start where the rows before it end (summed in the kernel)
  int64_t B, N, C;
  int64_t total_kept;  // rows of `index`; `tokens` has total_kept + B * fuse rows
  bool fuse;
  void* tokens;    // (total_kept + B * fuse, C) contiguous
  int64_t* index;  // (total_kept,)
  int32_t* slot;   // (B, N): row within the segment, -1 = dropped
  float* fused;    // (B, C)
  float* den;      // (B,) sum of the dropped scores
  // (B, 2N) scratch for the keys and slot map of rows too long for shared memory; null: on-chip (the
  // launcher then gives each row one block instead of one per channel block)
  uint32_t* scratch;
};

// Dynamic shared memory of the forward kernel per row (keys + slot map); above the device's limit the
// launcher asks for `scratch` in global memory instead.
inline int64_t topk_gather_row_smem_bytes(int64_t N) { return 2 * 4 * N; }

struct TopkGatherBackwardArgs {
  const void* grad_tokens;  // (total_kept + B * fuse, C) contiguous
  const void* x;            // (B, N, C)
  int64_t stride_xb, stride_xn;
  const float* scores;  // (B, N) contiguous
  const int64_t* k;
  const int32_t* slot;
  const float* fused;
  const float* den;
  int64_t B, N, C, total_rows;
  bool fuse;
  void* grad_x;        // (B, N, C) contiguous
  float* grad_scores;  // (B, N)
};

struct TextPatchScoresArgs {
  const void* query;  // (B, H, D)
  int64_t stride_qb, stride_qh;
  const void* keys;  // (B, N, H, D)
  int64_t stride_kb, stride_kn, stride_kh;
  int64_t B, N, H, D;
  float scale;
  float* scores;  // (B, N)
  float* logits;  // (B, H, N)
  float* lse;     // (B, H)
  // backward only
  const float* grad;  // (B, N) contiguous
  void* grad_query;   // (B, H, D) contiguous
  void* grad_keys;    // (B, N, H, D) contiguous
};

// Largest head dim of the text-patch kernels (the query of a head lives in registers).
constexpr int64_t kMaxHeadDim = 256;

// Whether a row of N tokens fits the on-chip selection on the current device (else pass `scratch`).
bool topk_gather_fits_on_chip(int64_t N);

// Each launcher returns nullptr on success, else a message (unsupported size or CUDA error).
const char* topk_gather_forward(Dtype dtype, const TopkGatherForwardArgs& args, void* stream);
const char* topk_gather_backward(Dtype dtype, const TopkGatherBackwardArgs& args, void* stream);
const char* text_patch_scores_forward(Dtype dtype, const TextPatchScoresArgs& args, void* stream);
const char* text_patch_scores_backward(Dtype dtype, const TextPatchScoresArgs& args, void* stream);

}  // namespace cuda
}  // namespace bus
