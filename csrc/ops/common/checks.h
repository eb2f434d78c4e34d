// Input checks of the bus::* ops, shared by the CPU and CUDA entry points.
//
// The messages match the Python layer (bus_kernels/_validation.py): they start with the argument's
// name, shapes print as Python tuples and dtypes as torch.<name>. TORCH_CHECK_TYPE raises TypeError
// and TORCH_CHECK_VALUE raises ValueError in Python, as the Python checks do.
//
// Every message is built here as one std::string (bus::msg: integers through std::to_string, devices
// through Device::str) and handed to the TORCH_CHECK_* macro whole, so c10::str never streams an
// integer through std::ostringstream. Why: the CUDA build on the H200 image (g++ 13.3, torch 2.11)
// died with SIGSEGV in every check whose message streamed integers, while checks streaming only
// strings raised fine (benchmarks/results/gpu_tests_h200.md, run 2); the num_put/locale path of that
// build is the suspect. A mitigation, not a verified cause: without a GPU the pre-fix build raises
// cleanly even with that image's g++ 13.3 / ld 2.42 / torch 2.11 (an Ubuntu 24.04 chroot), so the
// driver or device side may matter too.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

namespace bus {

namespace detail {

inline void append(std::string& out, const char* s) { out += s; }
inline void append(std::string& out, const std::string& s) { out += s; }
inline void append(std::string& out, const c10::Device& d) { out += d.str(); }

template <typename T, typename = std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>>>
inline void append(std::string& out, T v) {
  out += std::to_string(v);
}

}  // namespace detail

// The concatenation of ``parts`` (strings, integers, devices) as one std::string.
template <typename... Parts>
inline std::string msg(const Parts&... parts) {
  std::string out;
  (detail::append(out, parts), ...);
  return out;
}

inline std::string shape_str(const at::Tensor& t) {
  std::string out = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(t.size(i));
  }
  out += t.dim() == 1 ? ",)" : ")";
  return out;
}

inline std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline void check_rank(const char* name, const at::Tensor& t, int64_t rank, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank,
                    msg(name, " must have shape ", layout, " (", rank, " dims), got shape ", shape_str(t)));
}

// The dtypes the native kernels take (fp32 accumulation inside).
inline void check_kernel_float(const char* name, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK_TYPE(d == at::kHalf || d == at::kBFloat16 || d == at::kFloat,
                   msg(name, " must have a floating dtype (float16, bfloat16, float32), got ", dtype_str(d)));
}

inline void check_any_float(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()),
                   msg(name, " must have a floating dtype (float16, bfloat16, float32, float64), got ",
                       dtype_str(t.scalar_type())));
}

inline void check_dtype(const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, msg(name, " must have dtype ", dtype_str(want), ", got ",
                   dtype_str(t.scalar_type())));
}

inline void check_dim_size(const char* name, const at::Tensor& t, int64_t dim, int64_t size, const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == size, msg(name, " has size ", t.size(dim), " in dim ", dim, " (shape ",
                                             shape_str(t), "), expected ", size, " (", what, ")"));
}

inline void check_same_device(const char* name, const at::Tensor& t, const char* first_name, const at::Tensor& first) {
  TORCH_CHECK_VALUE(t.device() == first.device(), msg(name, " is on ", t.device(), " but ", first_name, " is on ",
                                                      first.device(), "; all inputs must be on one device"));
}

// bus::text_patch_scores(query (B, H, D), keys (B, N, H, D), scale)
inline void check_text_patch_scores(const at::Tensor& query, const at::Tensor& keys) {
  check_rank("query", query, 3, "(B, H, D)");
  check_rank("keys", keys, 4, "(B, N, H, D)");
  check_kernel_float("query", query);
  check_kernel_float("keys", keys);
  TORCH_CHECK_TYPE(query.scalar_type() == keys.scalar_type(),
                   msg("keys must have query's dtype ", dtype_str(query.scalar_type()), ", got ",
                       dtype_str(keys.scalar_type())));
  check_dim_size("keys", keys, 0, query.size(0), "batch size B of query");
  check_dim_size("keys", keys, 2, query.size(1), "head count H of query");
  check_dim_size("keys", keys, 3, query.size(2), "head dim D of query");
  TORCH_CHECK_VALUE(keys.size(1) >= 1, msg("keys must hold at least one token (N >= 1), got N=0"));
  TORCH_CHECK_VALUE(query.size(1) >= 1 && query.size(2) >= 1,
                    msg("query must have H >= 1 heads of D >= 1 dims, got shape ", shape_str(query)));
  check_same_device("keys", keys, "query", query);
}

inline void check_text_patch_scores_backward(const at::Tensor& grad, const at::Tensor& query, const at::Tensor& keys,
                                             const at::Tensor& logits, const at::Tensor& lse) {
  check_text_patch_scores(query, keys);
  const int64_t B = keys.size(0), N = keys.size(1), H = keys.size(2);
  check_rank("grad", grad, 2, "(B, N)");
  check_any_float("grad", grad);
  check_dim_size("grad", grad, 0, B, "batch size B of keys");
  check_dim_size("grad", grad, 1, N, "token count N of keys");
  check_rank("logits", logits, 3, "(B, H, N)");
  check_dtype("logits", logits, at::kFloat);
  check_dim_size("logits", logits, 0, B, "batch size B of keys");
  check_dim_size("logits", logits, 1, H, "head count H of keys");
  check_dim_size("logits", logits, 2, N, "token count N of keys");
  check_rank("lse", lse, 2, "(B, H)");
  check_dtype("lse", lse, at::kFloat);
  check_dim_size("lse", lse, 0, B, "batch size B of keys");
  check_dim_size("lse", lse, 1, H, "head count H of keys");
  check_same_device("grad", grad, "query", query);
  check_same_device("logits", logits, "query", query);
  check_same_device("lse", lse, "query", query);
}

// bus::topk_gather(x (B, N, C), scores (B, N), k (B,) int64, total_kept, fuse)
inline void check_topk_gather(const at::Tensor& x, const at::Tensor& scores, const at::Tensor& k, int64_t total_kept) {
  check_rank("x", x, 3, "(B, N, C)");
  check_rank("scores", scores, 2, "(B, N)");
  check_kernel_float("x", x);
  check_any_float("scores", scores);
  check_dim_size("scores", scores, 0, x.size(0), "batch size B of x");
  check_dim_size("scores", scores, 1, x.size(1), "token count N of x");
  check_rank("k", k, 1, "(B,)");
  check_dtype("k", k, at::kLong);
  check_dim_size("k", k, 0, x.size(0), "batch size B of x");
  check_same_device("scores", scores, "x", x);
  check_same_device("k", k, "x", x);
  TORCH_CHECK_VALUE(total_kept >= 0, msg("total_kept must be >= 0, got ", total_kept));
}

inline void check_topk_gather_backward(const at::Tensor& grad_tokens, const at::Tensor& x, const at::Tensor& scores,
                                       const at::Tensor& k, const at::Tensor& slot, const at::Tensor& fused,
                                       const at::Tensor& den) {
  check_topk_gather(x, scores, k, 0);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  check_rank("grad_tokens", grad_tokens, 2, "(total, C)");
  check_any_float("grad_tokens", grad_tokens);
  check_dim_size("grad_tokens", grad_tokens, 1, C, "channel count C of x");
  check_rank("slot", slot, 2, "(B, N)");
  check_dtype("slot", slot, at::kInt);
  check_dim_size("slot", slot, 0, B, "batch size B of x");
  check_dim_size("slot", slot, 1, N, "token count N of x");
  check_rank("fused", fused, 2, "(B, C)");
  check_dtype("fused", fused, at::kFloat);
  check_dim_size("fused", fused, 0, B, "batch size B of x");
  check_dim_size("fused", fused, 1, C, "channel count C of x");
  check_rank("den", den, 1, "(B,)");
  check_dtype("den", den, at::kFloat);
  check_dim_size("den", den, 0, B, "batch size B of x");
  check_same_device("grad_tokens", grad_tokens, "x", x);
  check_same_device("slot", slot, "x", x);
  check_same_device("fused", fused, "x", x);
  check_same_device("den", den, "x", x);
}

}  // namespace bus
