// Schemas of the bus::* native ops and their CPU kernels. The CUDA kernels register themselves in
// csrc/ops/cuda/dispatch.cpp (compiled only when the extension is built with CUDA).
//
// The Python side defines other ops in the same namespace (bus::*_triton via torch.library.custom_op),
// hence a FRAGMENT. Autograd and the fake (meta) kernels are registered from bus_kernels/native.py.
#include <torch/library.h>

#include "cpu/ops.h"

TORCH_LIBRARY_FRAGMENT(bus, m) {
  m.def("text_patch_scores(Tensor query, Tensor keys, float scale) -> (Tensor scores, Tensor logits, Tensor lse)");
  m.def(
      "text_patch_scores_backward(Tensor grad, Tensor query, Tensor keys, Tensor logits, Tensor lse, float scale)"
      " -> (Tensor grad_query, Tensor grad_keys)");
  m.def(
      "topk_gather(Tensor x, Tensor scores, Tensor k, int total_kept, bool fuse)"
      " -> (Tensor tokens, Tensor index, Tensor slot, Tensor fused, Tensor den)");
  m.def(
      "topk_gather_backward(Tensor grad_tokens, Tensor x, Tensor scores, Tensor k, Tensor slot, Tensor fused,"
      " Tensor den, bool fuse) -> (Tensor grad_x, Tensor grad_scores)");
}

TORCH_LIBRARY_IMPL(bus, CPU, m) {
  m.impl("text_patch_scores", &bus::cpu::text_patch_scores);
  m.impl("text_patch_scores_backward", &bus::cpu::text_patch_scores_backward);
  m.impl("topk_gather", &bus::cpu::topk_gather);
  m.impl("topk_gather_backward", &bus::cpu::topk_gather_backward);
}
