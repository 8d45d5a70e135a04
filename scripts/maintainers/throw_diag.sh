#!/usr/bin/env bash
# Device diagnostic: which esparse error paths crash, and where (scripts/maintainers/segv_where.c prints the native location).
OUT=${OUT:-out}; mkdir -p "$OUT"
gcc -shared -fPIC -O1 -o /tmp/segv_where.so scripts/maintainers/segv_where.c -ldl
g++ --version | head -1 > "$OUT/diag.txt"
for c in info build_ok build dense linear search; do
  echo "--- case $c" >> "$OUT/diag.txt"
  LD_PRELOAD=/tmp/segv_where.so timeout 60 .venv/bin/python scripts/maintainers/throw_cases.py "$c" >> "$OUT/diag.txt" 2>&1
  echo "rc=$?" >> "$OUT/diag.txt"
done
grep -v "SEGV_WHERE stack" "$OUT/diag.txt"
echo "--- bindings of unwinder symbols (case build)"
LD_DEBUG=bindings timeout 60 .venv/bin/python scripts/maintainers/throw_cases.py build 2>&1 \
  | grep -E "cxa_throw|_Unwind_RaiseException|_Unwind_Resume|gxx_personality|cxa_begin_catch|_Unwind_Find_FDE" \
  | sed 's/^ *[0-9]*: *//' | sort | uniq -c | sort -rn | head -40 | tee "$OUT/bindings.txt"
