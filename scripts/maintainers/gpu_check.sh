#!/usr/bin/env bash
# The GPU verification run, one stage per device call (the machine stays up between back-to-back calls).
# Logs and results go under $OUT (the device tool brings them back). Stages:
#   setup   README's setup on the image's torch (offline: wheels from .dev/whl), esparse env
#   stage   no install, no plugin: the package copied to /tmp/esparse-stage and run by the image's python3 (seconds,
#           for a short device call: our Triton kernels need no build; later stages use it)
#   test    python -m pytest -m "gpu and not real" with the cuSPARSELt chosen by the environment
#   decode  tests/test_gpu_decode.py alone (our 2:4 kernel, decode attention, the compiled step)
#   gemm    bench/gemm.py (LLaMA-7B and 13B shapes)       e2e  esparse bench --shape llama-7b / llama-13b
#   assets  joins the GGUF parts (/root/assets/g1, g2 copied by earlier calls; .dev/g3 carried now) into the cache
#   real    the real-model GPU test and esparse demo --device cuda (needs the assets in $ESPARSE_CACHE)
#   errors  the plugin's C++ error paths (scripts/maintainers/throw_cases.py): each must print its message, not crash
#   accuracy bench/accuracy.py, full protocol, seeds $SEEDS (default 0,1,2) over $VARIANTS (WikiText-2 at .dev/wt)
# Carry folders come from scripts/maintainers/device_assets.sh (and ../shared/tools/cusparselt010.sh for cuSPARSELt 0.10).
# ESPARSE_CUSPARSELT=/root/cslt/lib/libcusparseLt.so.0 runs a stage on the private cuSPARSELt 0.10.
# gemm and e2e stop after GEMM_TIMEOUT / E2E_TIMEOUT seconds (a device call has 600), keeping what they wrote.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
tag=${TAG:-run}
py=.venv/bin/python
esparse=.venv/bin/esparse
for stage in "$@"; do
  echo "=== $stage ($tag) $(date +%T)"
  case $stage in
    setup)
      nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/smi.txt"
      ESPARSE_BUILD_PLUGIN=ON PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/.dev/whl ESPARSE_EXTRAS=${ESPARSE_EXTRAS-gguf} bash scripts/setup.sh 2>&1 | tail -60 \
        | tee "$OUT/setup.log" ;;
    stage) st=/tmp/esparse-stage; rm -rf $st && mkdir -p $st && cp -r esparse $st/ \
             && cp -r converter python_api ft_plugin $st/esparse/ && export PYTHONSAFEPATH=1 PYTHONPATH=$st${PYTHONPATH:+:$PYTHONPATH}
           py=python3; esparse="python3 -m esparse.cli"
           nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/smi.txt" ;;
    env) $esparse env 2>&1 | tee "$OUT/env-$tag.txt" ;;
    test) timeout "${TEST_TIMEOUT:-400}" $py -m pytest -q -rs -m "gpu and not real" tests 2>&1 | tee "$OUT/gpu-$tag.log" | tail -40 ;;
    decode) timeout "${TEST_TIMEOUT:-300}" $py -m pytest -q -rs -x tests/test_gpu_decode.py ${DECODE_K:+-k "$DECODE_K"} 2>&1 | tee "$OUT/decode-$tag.log" | tail -30 ;;
    gemm) timeout "${GEMM_TIMEOUT:-400}" $py bench/gemm.py --models ${GEMM_MODELS:-llama-7b,llama-13b} --ms ${GEMM_MS:-1,2,4,8,16,32,64,128,2048} --iters 20 \
            --no-torch-sparse ${SWEEP:+--sweep $SWEEP} --copies 4 --out "$OUT/gemm-$tag" 2>&1 | tee "$OUT/gemm-$tag.log" | tail -80 ;;
    e2e) for s in ${SHAPES:-llama-7b}; do
           timeout "${E2E_TIMEOUT:-300}" $esparse bench --shape "$s" --batches ${BATCHES:-1,4,16,64} --prompt-len 2048 --decode-steps 32 \
             --backends ${BACKENDS:-torch,dense,sparse} --out "$OUT/e2e-$tag-$s" 2>&1 | tee "$OUT/e2e-$tag-$s.log" | tail -40
         done ;;
    assets) c=${ESPARSE_CACHE:-$HOME/.cache/esparse}; mkdir -p "$c/smollm2" && cp -r .dev/g3/text "$c/"
            cat /root/assets/g1 /root/assets/g2 .dev/g3/p > "$c/smollm2/$(cat .dev/g3/name)"
            echo "$(cat .dev/g3/sha256)  $c/smollm2/$(cat .dev/g3/name)" | sha256sum -c - ;;
    real) $py -m pytest -q -rs -m "gpu and real" tests/test_gpu.py 2>&1 | tee "$OUT/real-$tag.log" | tail -15
          .venv/bin/esparse demo --device cuda 2>&1 | tee "$OUT/demo-$tag.log" | tail -25 ;;
    errors) for c in build linear search; do $py scripts/maintainers/throw_cases.py "$c" 2>&1 | grep -v "cannot reuse"; done \
              | tee "$OUT/errors-$tag.txt" ;;
    accuracy) $py bench/accuracy.py --wikitext .dev/wt/wiki.test.raw --variants main,ablation --seeds "${SEEDS:-0,1,2}" \
                ${VARIANTS:+--only "$VARIANTS"} --out "$OUT/acc-$tag" 2>&1 | grep -v "it/s\|window/s\|layer/s" \
                | tee "$OUT/acc-$tag.log" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
