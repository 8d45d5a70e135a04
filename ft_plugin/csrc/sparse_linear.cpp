// Sparse-GEMM on cuSPARSELt: Y[M,N] = X[M,K] W^T (+ bias, + activation) with W 2:4 along K.
//
// Layout (column-major, as cuSPARSELt sees it): C[N, Mp] = op(A) B with A = W viewed as K x N (opA = T,
// the 2:4 structure runs along K), B = X^T as K x Mp and C = Y^T as N x Mp; row-major X and Y need no copy.
// The weight is checked and compressed once, into one compressed copy. Plans hold no weight data (shapes,
// dtype, epilogue, algorithm; the bias pointer when there is a bias), so they are built once per process for
// each such key and shared by every weight of that shape: a LLaMA-7B model needs a few dozen plan inits, not
// one per weight and M (thousands; each init costs milliseconds). Per call, padding and workspace come from
// torch's caching allocator (no host sync), so calls can be captured in CUDA graphs.
//
// Two designs, chosen by the loaded cuSPARSELt (docs/gpu_path.md has the measurements behind them):
// * tuned (0.10 and newer): plan-free compression (Compress2); cusparseLtMatmulSearch once per M bucket,
//   the found (algorithm id, split-k) set on every plan of that bucket. Python persists the choice per
//   (GPU, dtype, M bucket, N, K) in a cache file and hands it back with set_algo.
// * safe (0.8.x): compression under a plan (Compress(plan)) and the default algorithm on every plan. On
//   0.8.x a searched algorithm works only on the plan the weight was compressed under, and setting its id on
//   any other plan faults, so no search is run at all.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <atomic>
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
    auto fresh = std::make_unique<cusparseLtHandle_t>();
    ESPARSE_CHECK_CUSPARSE(cslt().cusparseLtInit(fresh.get()));
    h = std::move(fresh);
  }
  return h.get();
}

struct Plan {
  cusparseLtMatDescriptor_t mat_a, mat_b, mat_c;  // its own descriptors: a shared plan outlives any weight
  cusparseLtMatmulDescriptor_t matmul;
  cusparseLtMatmulAlgSelection_t alg_sel;
  cusparseLtMatmulPlan_t plan;
  int stage = 0;  // how far init got, so a failed init destroys only what exists
  int64_t workspace = 0;
  ~Plan() {
    const auto& api = cslt();
    if (stage >= 5) api.cusparseLtMatmulPlanDestroy(&plan);
    if (stage >= 4) api.cusparseLtMatmulAlgSelectionDestroy(&alg_sel);
    if (stage >= 3) api.cusparseLtMatDescriptorDestroy(&mat_c);
    if (stage >= 2) api.cusparseLtMatDescriptorDestroy(&mat_b);
    if (stage >= 1) api.cusparseLtMatDescriptorDestroy(&mat_a);
  }
};

// What a plan depends on. alg = -1: cuSPARSELt's default algorithm (the safe design, or no choice made yet).
struct PlanKey {
  int device;
  int64_t n, k, m_pad, act;
  int dtype;
  intptr_t bias;
  int64_t alg, split_k;
  bool operator<(const PlanKey& o) const {
    return std::tie(device, n, k, m_pad, act, dtype, bias, alg, split_k) <
           std::tie(o.device, o.n, o.k, o.m_pad, o.act, o.dtype, o.bias, o.alg, o.split_k);
  }
};

// Build a plan for Y^T[N, Mp] = W^T(2:4, K x N) X^T(K x Mp); alg < 0 leaves the default algorithm.
static std::unique_ptr<Plan> build_plan(cusparseLtHandle_t* handle, const PlanKey& key) {
  const auto& api = cslt();
  auto p = std::make_unique<Plan>();
  auto dt = static_cast<cudaDataType>(key.dtype);
  const int64_t n = key.n, k = key.k, m_pad = key.m_pad;
  ESPARSE_CHECK_CUSPARSE(api.cusparseLtStructuredDescriptorInit(handle, &p->mat_a, k, n, k, 16, dt,
                                                                CUSPARSE_ORDER_COL, CUSPARSELT_SPARSITY_50_PERCENT));
  p->stage = 1;
  ESPARSE_CHECK_CUSPARSE(api.cusparseLtDenseDescriptorInit(handle, &p->mat_b, k, m_pad, k, 16, dt, CUSPARSE_ORDER_COL));
  p->stage = 2;
  ESPARSE_CHECK_CUSPARSE(api.cusparseLtDenseDescriptorInit(handle, &p->mat_c, n, m_pad, n, 16, dt, CUSPARSE_ORDER_COL));
  p->stage = 3;
  ESPARSE_CHECK_CUSPARSE(api.cusparseLtMatmulDescriptorInit(handle, &p->matmul, CUSPARSE_OPERATION_TRANSPOSE,
                                                            CUSPARSE_OPERATION_NON_TRANSPOSE, &p->mat_a, &p->mat_b,
                                                            &p->mat_c, &p->mat_c, CUSPARSE_COMPUTE_32F));
  int one = 1;
  if (key.act == kRelu)
    ESPARSE_CHECK_CUSPARSE(
        api.cusparseLtMatmulDescSetAttribute(handle, &p->matmul, CUSPARSELT_MATMUL_ACTIVATION_RELU, &one, sizeof(one)));
  if (key.act == kGelu)
    ESPARSE_CHECK_CUSPARSE(
        api.cusparseLtMatmulDescSetAttribute(handle, &p->matmul, CUSPARSELT_MATMUL_ACTIVATION_GELU, &one, sizeof(one)));
  if (key.bias != 0) {
    const void* bias = reinterpret_cast<const void*>(key.bias);
    ESPARSE_CHECK_CUSPARSE(
        api.cusparseLtMatmulDescSetAttribute(handle, &p->matmul, CUSPARSELT_MATMUL_BIAS_POINTER, &bias, sizeof(bias)));
  }
  ESPARSE_CHECK_CUSPARSE(
      api.cusparseLtMatmulAlgSelectionInit(handle, &p->alg_sel, &p->matmul, CUSPARSELT_MATMUL_ALG_DEFAULT));
  p->stage = 4;
  if (key.alg >= 0) {
    int alg = static_cast<int>(key.alg), split_k = static_cast<int>(key.split_k);
    ESPARSE_CHECK_CUSPARSE(
        api.cusparseLtMatmulAlgSetAttribute(handle, &p->alg_sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg, sizeof(alg)));
    if (split_k >= 1)  // the search may report 0 or -1 (split-k not used): leave the attribute at its default
      ESPARSE_CHECK_CUSPARSE(api.cusparseLtMatmulAlgSetAttribute(handle, &p->alg_sel, CUSPARSELT_MATMUL_SPLIT_K,
                                                                 &split_k, sizeof(split_k)));
  }
  ESPARSE_CHECK_CUSPARSE(api.cusparseLtMatmulPlanInit(handle, &p->plan, &p->matmul, &p->alg_sel));
  p->stage = 5;
  size_t ws = 0;
  ESPARSE_CHECK_CUSPARSE(api.cusparseLtMatmulGetWorkspace(handle, &p->plan, &ws));
  p->workspace = static_cast<int64_t>(ws);
  return p;
}

static std::atomic<int64_t> g_plan_inits{0};  // plans built for matmuls in this process (tests read it)

// The process's plans, shared by all weights. Never freed before exit: a captured CUDA graph may still launch
// with one, and their number is bounded by shapes x padded M x epilogues (x biases: one per biased weight).
static Plan& shared_plan(cusparseLtHandle_t* handle, const PlanKey& key) {
  static std::mutex mu;
  static std::map<PlanKey, std::unique_ptr<Plan>>* plans = new std::map<PlanKey, std::unique_ptr<Plan>>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = plans->find(key);
  if (it != plans->end()) return *it->second;
  auto fresh = build_plan(handle, key);  // throws before anything is stored
  auto& slot = (*plans)[key];
  slot = std::move(fresh);
  ++g_plan_inits;
  return *slot;
}

class SparseWeight : public torch::CustomClassHolder {
 public:
  SparseWeight() = default;

  // Check and compress `dense`; "" on success, else the error (see guarded() in common.h).
  std::string build(const at::Tensor& dense) {
    return guarded([&] { build_impl(dense); return std::string(); }, std::string("error"));
  }

  void build_impl(const at::Tensor& dense) {
    TORCH_CHECK(!compressed_.defined(), "esparse: SparseWeight.build called twice");
    TORCH_CHECK(dense.is_cuda() && dense.dim() == 2, "esparse: SparseWeight takes a 2-D CUDA tensor [N, K]");
    check_sm80();
    n_ = dense.size(0);
    k_ = dense.size(1);
    TORCH_CHECK(n_ % kRowAlign == 0 && k_ % kRowAlign == 0, "esparse: N and K must be multiples of 16, got [",
                n_, ", ", k_, "]; pad the layer or keep it dense");
    dtype_ = dense.scalar_type();
    cuda_dtype(dtype_);
    device_ = dense.get_device();
    c10::cuda::CUDAGuard guard(device_);
    const auto& api = cslt();
    tuned_ = api.tuned;
    handle_ = handle_for_device(device_);
    auto w = dense.contiguous();
    // At most 2 nonzeros in every group of 4 along K (checked with torch, before cuSPARSELt sees it).
    const bool is_24 = w.view({n_, k_ / 4, 4}).ne(0).sum(-1).le(2).all().item<bool>();
    TORCH_CHECK(is_24, "esparse: weight [", n_, ", ", k_,
                "] is not 2:4 sparse along its input dim; prune it (esparse prune) or use dense_linear");
    // W row-major [N, K] == column-major K x N with leading dimension K.
    ESPARSE_CHECK_CUSPARSE(api.cusparseLtStructuredDescriptorInit(handle_, &mat_a_, k_, n_, k_, 16, cuda_dtype(dtype_),
                                                                  CUSPARSE_ORDER_COL, CUSPARSELT_SPARSITY_50_PERCENT));
    has_mat_a_ = true;
    auto stream = c10::cuda::getCurrentCUDAStream().stream();
    size_t size = 0, buffer = 0;
    std::unique_ptr<Plan> under;  // the plan the weight is compressed under (safe design)
    if (tuned_) {
      ESPARSE_CHECK_CUSPARSE(api.cusparseLtSpMMACompressedSize2(handle_, &mat_a_, &size, &buffer));
    } else {
      under = build_plan(handle_, key_for(kRowAlign, 0, kNone, -1, 1));
      ESPARSE_CHECK_CUSPARSE(api.cusparseLtSpMMACompressedSize(handle_, &under->plan, &size, &buffer));
    }
    compressed_ = at::empty({static_cast<int64_t>(size)}, w.options().dtype(at::kByte));
    auto scratch = at::empty({static_cast<int64_t>(buffer) + 1}, w.options().dtype(at::kByte));
    if (tuned_) {
      ESPARSE_CHECK_CUSPARSE(api.cusparseLtSpMMACompress2(handle_, &mat_a_, 1, CUSPARSE_OPERATION_TRANSPOSE,
                                                          w.data_ptr(), compressed_.data_ptr(), scratch.data_ptr(),
                                                          stream));
    } else {
      ESPARSE_CHECK_CUSPARSE(api.cusparseLtSpMMACompress(handle_, &under->plan, w.data_ptr(), compressed_.data_ptr(),
                                                         scratch.data_ptr(), stream));
    }
  }

  ~SparseWeight() override {
    if (has_mat_a_) cslt().cusparseLtMatDescriptorDestroy(&mat_a_);
  }

  at::Tensor forward(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t act) {
    TORCH_CHECK(x.is_cuda() && x.get_device() == device_, "esparse: input must be on the weight's GPU");
    TORCH_CHECK(x.scalar_type() == dtype_, "esparse: input dtype ", x.scalar_type(), " != weight dtype ", dtype_);
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k_, "esparse: input has ", x.dim() ? x.size(-1) : 0,
                " features, weight expects ", k_);
    TORCH_CHECK(act >= kNone && act <= kGelu, "esparse: unknown activation ", act);
    c10::cuda::CUDAGuard guard(device_);
    auto out_shape = x.sizes().vec();
    out_shape.back() = n_;
    auto x2 = x.reshape({-1, k_}).contiguous();
    const int64_t m = x2.size(0);
    if (m == 0) return at::empty(out_shape, x.options());
    const int64_t m_pad = pad_rows(m);
    const void* bias_ptr = nullptr;
    if (bias.has_value()) {
      TORCH_CHECK(bias->is_cuda() && bias->get_device() == device_ && bias->numel() == n_ &&
                      bias->scalar_type() == dtype_ && bias->is_contiguous(),
                  "esparse: bias must be a contiguous [", n_, "] tensor of the weight's dtype on its GPU");
      bias_ptr = bias->data_ptr();
    }
    Plan& p = plan_for(m_pad, bias_ptr, act);
    // Padding rows of X only feed padding rows of Y (every output row reads its own input row), so they need
    // no zeroing; the result is a view of the first m rows, no copy.
    at::Tensor xb = x2;
    if (m_pad != m) {
      xb = at::empty({m_pad, k_}, x.options());
      xb.narrow(0, 0, m).copy_(x2);
    }
    auto y = at::empty({m_pad, n_}, x.options());
    at::Tensor ws;
    if (p.workspace > 0) ws = at::empty({p.workspace}, x.options().dtype(at::kByte));
    float alpha = 1.0f, beta = 0.0f;
    auto stream = c10::cuda::getCurrentCUDAStream().stream();
    ESPARSE_CHECK_CUSPARSE(cslt().cusparseLtMatmul(handle_, &p.plan, &alpha, compressed_.data_ptr(), xb.data_ptr(),
                                                   &beta, y.data_ptr(), y.data_ptr(),
                                                   ws.defined() ? ws.data_ptr() : nullptr, &stream, 1));
    return (m_pad == m ? y : y.narrow(0, 0, m)).view(out_shape);
  }

  std::vector<int64_t> search(int64_t m) {
    return guarded([&] { return search_impl(m); }, std::vector<int64_t>());
  }

  bool set_algo(int64_t m, int64_t alg, int64_t split_k) {
    return guarded([&] { set_algo_impl(m, alg, split_k); return true; }, false);
  }

  // Run cusparseLtMatmulSearch for this padded M; returns {alg_id, split_k} and keeps them for the bucket.
  std::vector<int64_t> search_impl(int64_t m) {
    TORCH_CHECK(tuned_, "esparse: search needs cuSPARSELt 0.10 or newer (the loaded ", cslt().major, ".",
                cslt().minor, ".", cslt().patch, " runs its default algorithm); see esparse install-cusparselt");
    c10::cuda::CUDAGuard guard(device_);
    const int64_t m_pad = pad_rows(std::max<int64_t>(m, 1));
    auto p = build_plan(handle_, key_for(m_pad, 0, kNone, -1, 1));  // its own: the search writes its alg_sel
    auto x = at::randn({m_pad, k_}, compressed_.options().dtype(dtype_));
    auto y = at::empty({m_pad, n_}, x.options());
    auto ws = at::empty({p->workspace + 1}, compressed_.options());
    float alpha = 1.0f, beta = 0.0f;
    auto stream = c10::cuda::getCurrentCUDAStream().stream();
    const auto& api = cslt();
    ESPARSE_CHECK_CUSPARSE(api.cusparseLtMatmulSearch(handle_, &p->plan, &alpha, compressed_.data_ptr(),
                                                      x.data_ptr(), &beta, y.data_ptr(), y.data_ptr(), ws.data_ptr(),
                                                      &stream, 1));
    int alg = 0, split_k = 1;
    ESPARSE_CHECK_CUSPARSE(
        api.cusparseLtMatmulAlgGetAttribute(handle_, &p->alg_sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg, sizeof(alg)));
    ESPARSE_CHECK_CUSPARSE(api.cusparseLtMatmulAlgGetAttribute(handle_, &p->alg_sel, CUSPARSELT_MATMUL_SPLIT_K,
                                                               &split_k, sizeof(split_k)));
    set_algo_impl(m_pad, alg, split_k);
    return {alg, split_k};
  }

  // Use (alg_id, split_k) for every padded M of this bucket; plans built before for it are rebuilt.
  void set_algo_impl(int64_t m, int64_t alg, int64_t split_k) {
    TORCH_CHECK(tuned_, "esparse: set_algo needs cuSPARSELt 0.10 or newer (the loaded one runs its default)");
    TORCH_CHECK(alg >= 0 && split_k >= -1, "esparse: bad algorithm (", alg, ", split-k ", split_k, ")");
    const int64_t bucket = search_bucket(pad_rows(std::max<int64_t>(m, 1)));
    std::lock_guard<std::mutex> lock(mu_);
    algos_[bucket] = {alg, split_k};
    for (auto it = plans_.begin(); it != plans_.end();) {  // forget this bucket's plans: the next call looks up
      it = search_bucket(std::get<0>(it->first)) == bucket ? plans_.erase(it) : std::next(it);  // the new key
    }
  }

  bool has_algo(int64_t m) const { return algos_.count(search_bucket(pad_rows(std::max<int64_t>(m, 1)))) > 0; }
  bool tuned() const { return tuned_; }
  int64_t nbytes() const { return compressed_.numel(); }
  std::vector<int64_t> shape() const { return {n_, k_}; }

 private:
  PlanKey key_for(int64_t m_pad, intptr_t bias, int64_t act, int64_t alg, int64_t split_k) const {
    return PlanKey{device_, n_, k_, m_pad, act, static_cast<int>(cuda_dtype(dtype_)), bias, alg, split_k};
  }

  // This weight's plan for (padded M, bias, activation): the process-wide plan of its key, remembered here so
  // that a call costs one small map lookup.
  Plan& plan_for(int64_t m_pad, const void* bias, int64_t act) {
    auto local = std::make_tuple(m_pad, reinterpret_cast<intptr_t>(bias), act);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = plans_.find(local);
    if (it != plans_.end()) return *it->second;
    int64_t alg = -1, split_k = 1;
    if (tuned_) {
      auto found = algos_.find(search_bucket(m_pad));
      if (found != algos_.end()) std::tie(alg, split_k) = found->second;
    }
    Plan& p = shared_plan(handle_, key_for(m_pad, reinterpret_cast<intptr_t>(bias), act, alg, split_k));
    plans_[local] = &p;
    return p;
  }

  int64_t n_ = 0, k_ = 0;
  int device_ = 0;
  bool tuned_ = false, has_mat_a_ = false;
  at::ScalarType dtype_ = at::kHalf;
  cusparseLtHandle_t* handle_ = nullptr;
  cusparseLtMatDescriptor_t mat_a_;
  at::Tensor compressed_;
  std::mutex mu_;
  std::map<std::tuple<int64_t, intptr_t, int64_t>, Plan*> plans_;  // into the shared plans
  std::map<int64_t, std::pair<int64_t, int64_t>> algos_;
};

at::Tensor sparse_linear(const at::Tensor& x, const c10::intrusive_ptr<SparseWeight>& w,
                         const c10::optional<at::Tensor>& bias, int64_t act) {
  return guarded([&] { return w->forward(x, bias, act); }, at::Tensor());
}

std::string last_error() { return g_last_error; }

int64_t plan_inits() { return g_plan_inits.load(); }

}  // namespace esparse

TORCH_LIBRARY_FRAGMENT(esparse, m) {
  m.class_<esparse::SparseWeight>("SparseWeight")
      .def(torch::init<>())
      .def("build", &esparse::SparseWeight::build)
      .def("search", &esparse::SparseWeight::search)
      .def("set_algo", &esparse::SparseWeight::set_algo)
      .def("has_algo", &esparse::SparseWeight::has_algo)
      .def("tuned", &esparse::SparseWeight::tuned)
      .def("nbytes", &esparse::SparseWeight::nbytes)
      .def("shape", &esparse::SparseWeight::shape);
  m.def("sparse_linear(Tensor x, __torch__.torch.classes.esparse.SparseWeight w, Tensor? bias, int act) -> Tensor",
        &esparse::sparse_linear);
  m.def("last_error() -> str", &esparse::last_error);
  m.def("plan_inits() -> int", &esparse::plan_inits);
}
