// Sparse-GEMM on cuSPARSELt: Y[M,N] = X[M,K] W^T (+ bias, + activation) with W 2:4 along K.
//
// Layout (column-major, as cuSPARSELt sees it): C[N, Mp] = op(A) B with A = W viewed as K x N (opA = T,
// the 2:4 structure runs along K), B = X^T as K x Mp and C = Y^T as N x Mp; row-major X and Y need no copy.
// The weight is checked (PruneCheck2) and compressed once; a plan is built per padded M (and bias,
// activation) and kept, with its workspace and padding buffers, so a call after warm-up allocates nothing
// new from the driver and never syncs the host: both paths can be captured in CUDA graphs.
// The algorithm id and split-k of each (M bucket) come from cusparseLtMatmulSearch once; Python persists
// them per (GPU, dtype, M bucket, N, K) in a cache file and hands them back with set_algo.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "common.h"

namespace esparse {

void check_sm80() {
  int device = 0;
  cudaDeviceProp prop;
  TORCH_CHECK(cudaGetDevice(&device) == cudaSuccess && cudaGetDeviceProperties(&prop, device) == cudaSuccess,
              "esparse: cannot query the current CUDA device");
  TORCH_CHECK(prop.major >= 8, "esparse: ", prop.name, " (sm_", prop.major, prop.minor,
              ") has no sparse tensor cores; use the dense path (dense_linear / --dense)");
}

static cusparseLtHandle_t* handle_for_device(int device) {
  static std::mutex mu;
  static std::map<int, std::unique_ptr<cusparseLtHandle_t>> handles;
  std::lock_guard<std::mutex> lock(mu);
  auto& h = handles[device];
  if (!h) {
    h = std::make_unique<cusparseLtHandle_t>();
    ESPARSE_CHECK_CUSPARSE(cusparseLtInit(h.get()));
  }
  return h.get();
}

struct Plan {
  cusparseLtMatDescriptor_t mat_b, mat_c;
  cusparseLtMatmulDescriptor_t matmul;
  cusparseLtMatmulAlgSelection_t alg_sel;
  cusparseLtMatmulPlan_t plan;
  at::Tensor workspace, x_pad, y_pad;
  ~Plan() {
    cusparseLtMatmulPlanDestroy(&plan);
    cusparseLtMatmulAlgSelectionDestroy(&alg_sel);
    cusparseLtMatDescriptorDestroy(&mat_b);
    cusparseLtMatDescriptorDestroy(&mat_c);
  }
};

class SparseWeight : public torch::CustomClassHolder {
 public:
  explicit SparseWeight(const at::Tensor& dense) {
    TORCH_CHECK(dense.is_cuda() && dense.dim() == 2, "esparse: SparseWeight takes a 2-D CUDA tensor [N, K]");
    check_sm80();
    n_ = dense.size(0);
    k_ = dense.size(1);
    TORCH_CHECK(n_ % kRowAlign == 0 && k_ % kRowAlign == 0, "esparse: N and K must be multiples of 16, got [",
                n_, ", ", k_, "]");
    dtype_ = dense.scalar_type();
    cuda_dtype(dtype_);
    device_ = dense.get_device();
    c10::cuda::CUDAGuard guard(device_);
    handle_ = handle_for_device(device_);
    auto w = dense.contiguous();
    // W row-major [N, K] == column-major K x N with leading dimension K.
    ESPARSE_CHECK_CUSPARSE(cusparseLtStructuredDescriptorInit(handle_, &mat_a_, k_, n_, k_, 16, cuda_dtype(dtype_),
                                                              CUSPARSE_ORDER_COL, CUSPARSELT_SPARSITY_50_PERCENT));
    auto stream = c10::cuda::getCurrentCUDAStream().stream();
    auto valid = at::zeros({1}, dense.options().dtype(at::kInt));
    ESPARSE_CHECK_CUSPARSE(cusparseLtSpMMAPruneCheck2(handle_, &mat_a_, 1, CUSPARSE_OPERATION_TRANSPOSE,
                                                      w.data_ptr(), valid.data_ptr<int>(), stream));
    TORCH_CHECK(valid.item<int>() == 0, "esparse: weight [", n_, ", ", k_,
                "] is not 2:4 sparse along its input dim; prune it (esparse prune) or use dense_linear");
    size_t size = 0, buffer = 0;
    ESPARSE_CHECK_CUSPARSE(cusparseLtSpMMACompressedSize2(handle_, &mat_a_, &size, &buffer));
    compressed_ = at::empty({static_cast<int64_t>(size)}, w.options().dtype(at::kByte));
    auto scratch = at::empty({static_cast<int64_t>(buffer) + 1}, w.options().dtype(at::kByte));
    ESPARSE_CHECK_CUSPARSE(cusparseLtSpMMACompress2(handle_, &mat_a_, 1, CUSPARSE_OPERATION_TRANSPOSE, w.data_ptr(),
                                                    compressed_.data_ptr(), scratch.data_ptr(), stream));
  }

  ~SparseWeight() override {
    plans_.clear();
    cusparseLtMatDescriptorDestroy(&mat_a_);
  }

  at::Tensor forward(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t act) {
    TORCH_CHECK(x.is_cuda() && x.get_device() == device_, "esparse: input must be on the weight's GPU");
    TORCH_CHECK(x.scalar_type() == dtype_, "esparse: input dtype ", x.scalar_type(), " != weight dtype ", dtype_);
    TORCH_CHECK(x.size(-1) == k_, "esparse: input has ", x.size(-1), " features, weight expects ", k_);
    c10::cuda::CUDAGuard guard(device_);
    auto x2 = x.reshape({-1, k_}).contiguous();
    const int64_t m = x2.size(0);
    const int64_t m_pad = pad_rows(std::max<int64_t>(m, 1));
    const void* bias_ptr = nullptr;
    if (bias.has_value()) {
      TORCH_CHECK(bias->numel() == n_ && bias->scalar_type() == dtype_ && bias->is_contiguous(),
                  "esparse: bias must be a contiguous [", n_, "] tensor of the weight's dtype");
      bias_ptr = bias->data_ptr();
    }
    Plan& p = plan_for(m_pad, bias_ptr, act);
    auto out_shape = x.sizes().vec();
    out_shape.back() = n_;
    const void* b_ptr = x2.data_ptr();
    void* d_ptr;
    at::Tensor y;
    if (m_pad == m) {
      y = at::empty({m, n_}, x.options());
      d_ptr = y.data_ptr();
    } else {  // pad rows into the plan's own buffers (no allocation after the first call of this M)
      p.x_pad.narrow(0, 0, m).copy_(x2);
      b_ptr = p.x_pad.data_ptr();
      d_ptr = p.y_pad.data_ptr();
    }
    float alpha = 1.0f, beta = 0.0f;
    auto stream = c10::cuda::getCurrentCUDAStream().stream();
    ESPARSE_CHECK_CUSPARSE(cusparseLtMatmul(handle_, &p.plan, &alpha, compressed_.data_ptr(), b_ptr, &beta, d_ptr,
                                            d_ptr, p.workspace.data_ptr(), &stream, 1));
    if (m_pad != m) y = p.y_pad.narrow(0, 0, m).clone();
    return y.view(out_shape);
  }

  // Run cusparseLtMatmulSearch for this padded M; returns {alg_id, split_k} and keeps them for the bucket.
  std::vector<int64_t> search(int64_t m) {
    c10::cuda::CUDAGuard guard(device_);
    const int64_t m_pad = pad_rows(std::max<int64_t>(m, 1));
    Plan& p = plan_for(m_pad, nullptr, kNone, /*searching=*/true);
    auto x = at::randn({m_pad, k_}, compressed_.options().dtype(dtype_));
    auto y = at::empty({m_pad, n_}, x.options());
    float alpha = 1.0f, beta = 0.0f;
    auto stream = c10::cuda::getCurrentCUDAStream().stream();
    ESPARSE_CHECK_CUSPARSE(cusparseLtMatmulSearch(handle_, &p.plan, &alpha, compressed_.data_ptr(), x.data_ptr(),
                                                  &beta, y.data_ptr(), y.data_ptr(), p.workspace.data_ptr(),
                                                  &stream, 1));
    int alg = 0, split_k = 1;
    ESPARSE_CHECK_CUSPARSE(
        cusparseLtMatmulAlgGetAttribute(handle_, &p.alg_sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg, sizeof(alg)));
    ESPARSE_CHECK_CUSPARSE(
        cusparseLtMatmulAlgGetAttribute(handle_, &p.alg_sel, CUSPARSELT_MATMUL_SPLIT_K, &split_k, sizeof(split_k)));
    set_algo(m_pad, alg, split_k);
    return {alg, split_k};
  }

  // Use (alg_id, split_k) for every padded M of this bucket; plans built before for it are rebuilt.
  void set_algo(int64_t m, int64_t alg, int64_t split_k) {
    const int64_t bucket = search_bucket(pad_rows(std::max<int64_t>(m, 1)));
    algos_[bucket] = {alg, split_k};
    for (auto it = plans_.begin(); it != plans_.end();) {
      it = search_bucket(std::get<0>(it->first)) == bucket ? plans_.erase(it) : std::next(it);
    }
  }

  bool has_algo(int64_t m) const { return algos_.count(search_bucket(pad_rows(std::max<int64_t>(m, 1)))) > 0; }
  int64_t nbytes() const { return compressed_.numel(); }
  std::vector<int64_t> shape() const { return {n_, k_}; }

 private:
  Plan& plan_for(int64_t m_pad, const void* bias, int64_t act, bool searching = false) {
    auto key = std::make_tuple(m_pad, reinterpret_cast<intptr_t>(bias), act);
    auto it = plans_.find(key);
    if (it != plans_.end() && !searching) return *it->second;
    if (searching) plans_.erase(key);
    auto p = std::make_unique<Plan>();
    auto dt = cuda_dtype(dtype_);
    ESPARSE_CHECK_CUSPARSE(cusparseLtDenseDescriptorInit(handle_, &p->mat_b, k_, m_pad, k_, 16, dt, CUSPARSE_ORDER_COL));
    ESPARSE_CHECK_CUSPARSE(cusparseLtDenseDescriptorInit(handle_, &p->mat_c, n_, m_pad, n_, 16, dt, CUSPARSE_ORDER_COL));
    ESPARSE_CHECK_CUSPARSE(cusparseLtMatmulDescriptorInit(handle_, &p->matmul, CUSPARSE_OPERATION_TRANSPOSE,
                                                          CUSPARSE_OPERATION_NON_TRANSPOSE, &mat_a_, &p->mat_b,
                                                          &p->mat_c, &p->mat_c, CUSPARSE_COMPUTE_32F));
    int one = 1;
    if (act == kRelu)
      ESPARSE_CHECK_CUSPARSE(cusparseLtMatmulDescSetAttribute(handle_, &p->matmul, CUSPARSELT_MATMUL_ACTIVATION_RELU,
                                                              &one, sizeof(one)));
    if (act == kGelu)
      ESPARSE_CHECK_CUSPARSE(cusparseLtMatmulDescSetAttribute(handle_, &p->matmul, CUSPARSELT_MATMUL_ACTIVATION_GELU,
                                                              &one, sizeof(one)));
    if (bias != nullptr)
      ESPARSE_CHECK_CUSPARSE(cusparseLtMatmulDescSetAttribute(handle_, &p->matmul, CUSPARSELT_MATMUL_BIAS_POINTER,
                                                              &bias, sizeof(bias)));
    ESPARSE_CHECK_CUSPARSE(
        cusparseLtMatmulAlgSelectionInit(handle_, &p->alg_sel, &p->matmul, CUSPARSELT_MATMUL_ALG_DEFAULT));
    auto found = algos_.find(search_bucket(m_pad));
    if (found != algos_.end() && !searching) {
      int alg = static_cast<int>(found->second.first), split_k = static_cast<int>(found->second.second);
      ESPARSE_CHECK_CUSPARSE(cusparseLtMatmulAlgSetAttribute(handle_, &p->alg_sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID,
                                                             &alg, sizeof(alg)));
      ESPARSE_CHECK_CUSPARSE(cusparseLtMatmulAlgSetAttribute(handle_, &p->alg_sel, CUSPARSELT_MATMUL_SPLIT_K,
                                                             &split_k, sizeof(split_k)));
    }
    ESPARSE_CHECK_CUSPARSE(cusparseLtMatmulPlanInit(handle_, &p->plan, &p->matmul, &p->alg_sel));
    size_t ws = 0;
    ESPARSE_CHECK_CUSPARSE(cusparseLtMatmulGetWorkspace(handle_, &p->plan, &ws));
    auto opts = compressed_.options();
    p->workspace = at::empty({static_cast<int64_t>(ws) + 1}, opts);
    p->x_pad = at::zeros({m_pad, k_}, opts.dtype(dtype_));
    p->y_pad = at::empty({m_pad, n_}, opts.dtype(dtype_));
    auto& slot = plans_[key];
    slot = std::move(p);
    return *slot;
  }

  int64_t n_ = 0, k_ = 0;
  int device_ = 0;
  at::ScalarType dtype_ = at::kHalf;
  cusparseLtHandle_t* handle_ = nullptr;
  cusparseLtMatDescriptor_t mat_a_;
  at::Tensor compressed_;
  std::map<std::tuple<int64_t, intptr_t, int64_t>, std::unique_ptr<Plan>> plans_;
  std::map<int64_t, std::pair<int64_t, int64_t>> algos_;
};

at::Tensor sparse_linear(const at::Tensor& x, const c10::intrusive_ptr<SparseWeight>& w,
                         const c10::optional<at::Tensor>& bias, int64_t act) {
  return w->forward(x, bias, act);
}

}  // namespace esparse

TORCH_LIBRARY_FRAGMENT(esparse, m) {
  m.class_<esparse::SparseWeight>("SparseWeight")
      .def(torch::init<at::Tensor>())
      .def("search", &esparse::SparseWeight::search)
      .def("set_algo", &esparse::SparseWeight::set_algo)
      .def("has_algo", &esparse::SparseWeight::has_algo)
      .def("nbytes", &esparse::SparseWeight::nbytes)
      .def("shape", &esparse::SparseWeight::shape);
  m.def("sparse_linear(Tensor x, __torch__.torch.classes.esparse.SparseWeight w, Tensor? bias, int act) -> Tensor",
        &esparse::sparse_linear);
}
