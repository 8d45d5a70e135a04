#!/usr/bin/env bash
# Prepare, here, what the GPU machine cannot fetch, in carry-sized folders under .dev/ (ignored by git):
#   .dev/whl  the gguf wheel (setup's offline install: PIP_NO_INDEX=1 PIP_FIND_LINKS=.dev/whl ESPARSE_EXTRAS=gguf)
#   .dev/g1   14 MiB of the SmolLM2 GGUF (fits beside .cslt/part3 in one call)
#   .dev/g2   the next 60 MiB      .dev/g3  the rest + the C4 / Wikipedia text files of the asset cache
# On the machine, after the three calls: cat g1 g2 g3 into $ESPARSE_CACHE/smollm2/<name>.gguf, copy text/ beside
# it (scripts/maintainers/gpu_check.sh stage 'assets' does both), then `real` runs the GPU real-model test and the demo.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
py=${PY:-.venv/bin/python}
"$py" -c "from esparse.assets import real_assets; real_assets()"
cache=${ESPARSE_CACHE:-$HOME/.cache/esparse}
gguf=$(ls "$cache"/smollm2/*.gguf)
rm -rf .dev/whl .dev/g1 .dev/g2 .dev/g3 && mkdir -p .dev/whl .dev/g1 .dev/g2 .dev/g3
"$py" -m pip download -q --no-deps --only-binary=:all: -d .dev/whl gguf
dd if="$gguf" of=.dev/g1/p bs=1M count=14 status=none
dd if="$gguf" of=.dev/g2/p bs=1M skip=14 count=60 status=none
dd if="$gguf" of=.dev/g3/p bs=1M skip=74 status=none
cp -r "$cache/text" .dev/g3/
basename "$gguf" > .dev/g3/name
cat .dev/g1/p .dev/g2/p .dev/g3/p | sha256sum | cut -c1-64 > .dev/g3/sha256
du -sh .dev/*
