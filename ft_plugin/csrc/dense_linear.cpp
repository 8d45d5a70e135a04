// Dense twin of sparse_linear on cuBLASLt: same signature, so the decoder switches paths with one flag.
// Column-major view: C[N, M] = op(A) B with A = W as K x N (opA = T), B = X^T as K x M, C = Y^T as N x M.
// Descriptors and the heuristic's algorithm are cached per (device, dtype, M, N, K, bias, activation), the
// workspace once per device: no driver allocation or host sync after warm-up (CUDA-graph capturable).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "common.h"

namespace esparse {

namespace {

constexpr size_t kWorkspaceBytes = 32u << 20;

struct DensePlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo;
  ~DensePlan() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

using Key = std::tuple<int, int, int64_t, int64_t, int64_t, bool, int64_t>;

struct DenseState {
  std::mutex mu;
  std::map<int, cublasLtHandle_t> handles;
  std::map<int, at::Tensor> workspaces;
  std::map<Key, std::unique_ptr<DensePlan>> plans;
};

DenseState& state() {
  static DenseState s;
  return s;
}

cublasLtEpilogue_t epilogue(bool bias, int64_t act) {
  if (act == kRelu) return bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
  if (act == kGelu) return bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
  return bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
}

}  // namespace

at::Tensor dense_linear_impl(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                             int64_t act) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda() && w.dim() == 2, "esparse: dense_linear takes CUDA x [..., K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "esparse: x and w dtypes differ");
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(x.size(-1) == k, "esparse: input has ", x.size(-1), " features, weight expects ", k);
  const int device = x.get_device();
  c10::cuda::CUDAGuard guard(device);
  auto x2 = x.reshape({-1, k}).contiguous();
  auto wc = w.contiguous();
  const int64_t m = x2.size(0);
  auto dt = cuda_dtype(x.scalar_type());
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n && bias->scalar_type() == x.scalar_type() && bias->is_contiguous(),
                "esparse: bias must be a contiguous [", n, "] tensor of the input dtype");
    bias_ptr = bias->data_ptr();
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  auto y = at::empty({m, n}, x.options());
  if (m == 0) return y.view(out_shape);

  auto& s = state();
  DensePlan* plan;
  cublasLtHandle_t handle;
  at::Tensor workspace;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    auto& h = s.handles[device];
    if (!h) ESPARSE_CHECK_CUBLAS(cublasLtCreate(&h));
    handle = h;
    auto& ws = s.workspaces[device];
    if (!ws.defined()) ws = at::empty({static_cast<int64_t>(kWorkspaceBytes)}, x.options().dtype(at::kByte));
    workspace = ws;
    Key key{device, static_cast<int>(dt), m, n, k, bias_ptr != nullptr, act};
    auto& slot = s.plans[key];
    if (!slot) {
      auto p = std::make_unique<DensePlan>();
      ESPARSE_CHECK_CUBLAS(cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
      cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
      ESPARSE_CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
      ESPARSE_CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
      auto epi = epilogue(bias_ptr != nullptr, act);
      ESPARSE_CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
      if (bias_ptr != nullptr) {
        ESPARSE_CHECK_CUBLAS(
            cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &dt, sizeof(dt)));
      }
      ESPARSE_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&p->a, dt, k, n, k));
      ESPARSE_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&p->b, dt, k, m, k));
      ESPARSE_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&p->c, dt, n, m, n));
      cublasLtMatmulPreference_t pref;
      ESPARSE_CHECK_CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
      size_t wsb = kWorkspaceBytes;
      ESPARSE_CHECK_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb,
                                                                sizeof(wsb)));
      cublasLtMatmulHeuristicResult_t result;
      int found = 0;
      auto st = cublasLtMatmulAlgoGetHeuristic(handle, p->op, p->a, p->b, p->c, p->c, pref, 1, &result, &found);
      cublasLtMatmulPreferenceDestroy(pref);
      ESPARSE_CHECK_CUBLAS(st);
      TORCH_CHECK(found > 0, "esparse: cuBLASLt found no algorithm for [", m, ", ", k, "] x [", k, ", ", n, "]");
      p->algo = result.algo;
      slot = std::move(p);
    }
    plan = slot.get();
    // The descriptor is shared by every caller of this shape and cuBLASLt reads the bias pointer from it at
    // launch, so setting it and launching stay under the lock.
    if (bias_ptr != nullptr) {
      ESPARSE_CHECK_CUBLAS(
          cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr, sizeof(bias_ptr)));
    }
    float alpha = 1.0f, beta = 0.0f;
    auto stream = c10::cuda::getCurrentCUDAStream().stream();
    ESPARSE_CHECK_CUBLAS(cublasLtMatmul(handle, plan->op, &alpha, wc.data_ptr(), plan->a, x2.data_ptr(), plan->b,
                                        &beta, y.data_ptr(), plan->c, y.data_ptr(), plan->c, &plan->algo,
                                        workspace.data_ptr(), kWorkspaceBytes, stream));
  }
  return y.view(out_shape);
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, int64_t act) {
  return guarded([&] { return dense_linear_impl(x, w, bias, act); }, at::Tensor());
}

}  // namespace esparse

TORCH_LIBRARY_FRAGMENT(esparse, m) {
  m.def("dense_linear(Tensor x, Tensor w, Tensor? bias, int act) -> Tensor", &esparse::dense_linear);
}
