// cuSPARSELt, loaded at run time rather than linked.
//
// Why: torch links libcusparseLt.so.0 and loads its pinned copy at import (0.8.x for torch 2.11-2.14). A
// plugin linked against the same soname silently shares that copy, and 0.8.x cannot run a searched algorithm
// on any plan but the one the weight was compressed under (docs/gpu_path.md has the measurements). Loading
// through dlopen lets the plugin use either the process's copy or a private newer one (RTLD_LOCAL |
// RTLD_DEEPBIND, so its symbols never mix with torch's), chosen by the path Python hands to load().
// The API and the opaque struct sizes are the same in 0.8.x and 0.10 (the headers differ only in the
// version macros), so one build serves both.
#pragma once

#include <cusparseLt.h>

#include <string>

namespace esparse {

#define ESPARSE_CUSPARSELT_FUNCS(X)      \
  X(cusparseLtInit)                      \
  X(cusparseLtDestroy)                   \
  X(cusparseLtGetErrorString)            \
  X(cusparseLtGetProperty)               \
  X(cusparseLtStructuredDescriptorInit)  \
  X(cusparseLtDenseDescriptorInit)       \
  X(cusparseLtMatDescriptorDestroy)      \
  X(cusparseLtMatmulDescriptorInit)      \
  X(cusparseLtMatmulDescSetAttribute)    \
  X(cusparseLtMatmulAlgSelectionInit)    \
  X(cusparseLtMatmulAlgSetAttribute)     \
  X(cusparseLtMatmulAlgGetAttribute)     \
  X(cusparseLtMatmulAlgSelectionDestroy) \
  X(cusparseLtMatmulPlanInit)            \
  X(cusparseLtMatmulPlanDestroy)         \
  X(cusparseLtMatmulGetWorkspace)        \
  X(cusparseLtMatmul)                    \
  X(cusparseLtMatmulSearch)              \
  X(cusparseLtSpMMACompressedSize)       \
  X(cusparseLtSpMMACompress)             \
  X(cusparseLtSpMMACompressedSize2)      \
  X(cusparseLtSpMMACompress2)

struct CusparseLtApi {
#define ESPARSE_DECLARE_FN(name) decltype(&::name) name = nullptr;
  ESPARSE_CUSPARSELT_FUNCS(ESPARSE_DECLARE_FN)
#undef ESPARSE_DECLARE_FN
  std::string path;           // the file the functions come from
  bool private_copy = false;  // loaded beside (not shared with) the process's own cuSPARSELt
  int major = 0, minor = 0, patch = 0;
  // Searched algorithms are usable on every plan (0.10 and newer). When false the plugin compresses under a
  // plan and runs cuSPARSELt's default algorithm everywhere, the one combination measured correct on 0.8.x.
  bool tuned = false;
};

// Load cuSPARSELt once per process: `path` empty = the copy the process already has (torch's) or the one
// the dynamic linker finds; otherwise that file, privately. A later call with another path is an error.
const CusparseLtApi& cusparselt_load(const std::string& path);
// The loaded API (loading the process's copy on first use).
const CusparseLtApi& cslt();

}  // namespace esparse
