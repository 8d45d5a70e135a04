// Error checking shared by the sparse (cuSPARSELt) and dense (cuBLASLt) GEMM ops.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cublasLt.h>
#include <cusparseLt.h>

#include <exception>
#include <string>

#include "cusparselt_api.h"

#define ESPARSE_CHECK_CUSPARSE(expr)                                                              \
  do {                                                                                            \
    cusparseStatus_t _st = (expr);                                                                \
    TORCH_CHECK(_st == CUSPARSE_STATUS_SUCCESS, "esparse: ", #expr, " failed: ",                 \
                ::esparse::cslt().cusparseLtGetErrorString(_st));                                                   \
  } while (0)

#define ESPARSE_CHECK_CUBLAS(expr)                                                                \
  do {                                                                                            \
    cublasStatus_t _st = (expr);                                                                  \
    TORCH_CHECK(_st == CUBLAS_STATUS_SUCCESS, "esparse: ", #expr, " failed with status ",         \
                static_cast<int>(_st));                                                           \
  } while (0)

namespace esparse {

// Epilogues applied inside the GEMM (OPT's fc1 uses ReLU).
enum Activation : int64_t { kNone = 0, kRelu = 1, kGelu = 2 };

inline cudaDataType cuda_dtype(at::ScalarType t) {
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16,
              "esparse: sparse/dense linears take float16 or bfloat16 tensors, got ", t);
  return t == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
}

// Rows of the activation are padded to a multiple of this (cuSPARSELt needs 16-aligned dims). The Python
// twin of these two rules is ft_plugin/algo_cache.py (pad_rows, search_bucket); tests pin both.
constexpr int64_t kRowAlign = 16;
inline int64_t pad_rows(int64_t m) { return (m + kRowAlign - 1) / kRowAlign * kRowAlign; }
// Algorithm-search bucket of a padded row count: the next power of two (>= 16).
inline int64_t search_bucket(int64_t m_pad) {
  int64_t b = kRowAlign;
  while (b < m_pad) b <<= 1;
  return b;
}

void check_sm80();

// No exception ever leaves an esparse op, so that one message format and one error type (EsparseError) reach
// the user whatever failed, and a broken C++ runtime (docs/gpu_path.md: a static libstdc++ inside the plugin
// crashed every message with a number) cannot turn into a torch traceback. Each op runs its body under guarded(), which
// records the message here and returns a fallback (an undefined tensor = None in Python, an empty list,
// false); the Python wrappers (ft_plugin/ops.py) turn that into an EsparseError with last_error().
inline thread_local std::string g_last_error;

template <class F, class R>
R guarded(F&& body, R fallback) {
  g_last_error.clear();
  try {
    return body();
  } catch (const c10::Error& e) {
    g_last_error = e.what_without_backtrace();
  } catch (const std::exception& e) {
    g_last_error = e.what();
  } catch (...) {
    g_last_error = "esparse: unknown C++ error";
  }
  return fallback;
}

}  // namespace esparse
