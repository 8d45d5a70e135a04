// Run-time loading of cuSPARSELt (see cusparselt_api.h for why) and the ops that report what was loaded.
#include "cusparselt_api.h"

#include "common.h"

#include <c10/util/Exception.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#include <tuple>

namespace esparse {

namespace {

constexpr const char* kSoname = "libcusparseLt.so.0";

std::mutex& load_mutex() {
  static std::mutex mu;
  return mu;
}

std::unique_ptr<CusparseLtApi>& loaded() {
  static std::unique_ptr<CusparseLtApi> api;
  return api;
}

std::string& requested_path() {
  static std::string p;
  return p;
}

std::string dl_error() {
  const char* e = dlerror();
  return e ? e : "unknown dlopen error";
}

std::unique_ptr<CusparseLtApi> open_api(const std::string& path) {
  void* lib = nullptr;
  auto api = std::make_unique<CusparseLtApi>();
  if (path.empty()) {
    // The process's copy when torch (or anything else) has loaded one; else what the linker finds.
    lib = dlopen(kSoname, RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen(kSoname, RTLD_NOW | RTLD_GLOBAL);
    TORCH_CHECK(lib != nullptr, "esparse: cannot load ", kSoname, " (", dl_error(),
                "); install it with: python -m pip install nvidia-cusparselt-cu13, or set ESPARSE_CUSPARSELT to "
                "the file");
  } else {
    // A private copy: its own symbol scope first, never bound to (or binding) the process's cuSPARSELt.
    lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    TORCH_CHECK(lib != nullptr, "esparse: cannot load cuSPARSELt from ", path, " (", dl_error(),
                "); point ESPARSE_CUSPARSELT at a libcusparseLt.so.0 or unset it");
    api->private_copy = true;
  }
#define ESPARSE_LOAD_FN(name)                                                                              \
  api->name = reinterpret_cast<decltype(&::name)>(dlsym(lib, #name));                                      \
  TORCH_CHECK(api->name != nullptr, "esparse: the cuSPARSELt at ", path.empty() ? kSoname : path.c_str(), \
              " has no ", #name, "; it is older than esparse supports (0.8 or newer)");
  ESPARSE_CUSPARSELT_FUNCS(ESPARSE_LOAD_FN)
#undef ESPARSE_LOAD_FN
  Dl_info info;
  api->path = dladdr(reinterpret_cast<void*>(api->cusparseLtInit), &info) && info.dli_fname ? info.dli_fname : path;
  api->cusparseLtGetProperty(MAJOR_VERSION, &api->major);
  api->cusparseLtGetProperty(MINOR_VERSION, &api->minor);
  api->cusparseLtGetProperty(PATCH_LEVEL, &api->patch);
  api->tuned = std::make_tuple(api->major, api->minor) >= std::make_tuple(0, 10);
  if (const char* mode = std::getenv("ESPARSE_SPGEMM_MODE")) {  // diagnosis: force one design
    const std::string m(mode);
    TORCH_CHECK(m == "tuned" || m == "safe" || m.empty(), "esparse: ESPARSE_SPGEMM_MODE is 'tuned' or 'safe', got '",
                m, "'");
    if (!m.empty()) api->tuned = m == "tuned";
  }
  return api;
}

}  // namespace

const CusparseLtApi& cusparselt_load(const std::string& path) {
  std::lock_guard<std::mutex> lock(load_mutex());
  auto& api = loaded();
  if (api) {
    TORCH_CHECK(path.empty() || path == requested_path(), "esparse: cuSPARSELt is already loaded from ", api->path,
                "; choose the copy (ESPARSE_CUSPARSELT) before the first sparse op of the process");
    return *api;
  }
  api = open_api(path);
  requested_path() = path;
  return *api;
}

const CusparseLtApi& cslt() {
  {
    std::lock_guard<std::mutex> lock(load_mutex());
    if (loaded()) return *loaded();
  }
  return cusparselt_load("");
}

}  // namespace esparse

namespace {

using Info = std::tuple<std::string, int64_t, int64_t, int64_t, bool, bool>;

Info cusparselt_info(const std::string& path) {
  return esparse::guarded(
      [&] {
        const auto& api = esparse::cusparselt_load(path);
        return Info{api.path, api.major, api.minor, api.patch, api.private_copy, api.tuned};
      },
      Info{"", -1, -1, -1, false, false});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(esparse, m) {
  // Loads (once) and describes the cuSPARSELt in use: (path, major, minor, patch, private copy, tuned).
  m.def("cusparselt_info(str path) -> (str, int, int, int, bool, bool)", &cusparselt_info);
}
