#!/usr/bin/env bash
# Train the quick preset (Table 1, seed 0, fp32, 1 thread) with two commits of cqd and compare every cell.
# Usage: bash scripts/compare_commits.sh OLD_REV [NEW_REV]   (NEW_REV: the working tree)
# Each commit runs from its own source tree (PYTHONPATH) into its own folder under ${OUT:-/tmp/compare}.
set -euo pipefail
cd "$(dirname "$0")/.."
old=$1; new=${2:-}; out=${OUT:-/tmp/compare}
rm -rf "$out"; mkdir -p "$out/src-old" "$out/src-new"
git archive "$old" src | tar -x -C "$out/src-old"
if [ -n "$new" ]; then git archive "$new" src | tar -x -C "$out/src-new"; else cp -r src "$out/src-new/"; fi
for side in old new; do
  (cd "$out" && OMP_NUM_THREADS=1 PYTHONPATH="$out/src-$side/src" python -m cqd table --config quick \
      out_dir="$out/run-$side" base.train.precision=32-true > "$out/$side.log" 2>&1) &
done
wait
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def cells(side):
    return {str(p.parent.relative_to(out / f"run-{side}")): json.loads(p.read_text())
            for p in (out / f"run-{side}").rglob("result.json")}
a, b = cells("old"), cells("new")
print(f"{'cell':<45} {'old acc_hq':>10} {'new acc_hq':>10} {'old acc_lq':>10} {'new acc_lq':>10}")
same = 0
for k in sorted(a.keys() | b.keys()):
    ra, rb = a.get(k, {}), b.get(k, {})
    eq = (ra.get("acc_hq"), ra.get("acc_lq")) == (rb.get("acc_hq"), rb.get("acc_lq"))
    same += eq
    print(f"{k:<45} {ra.get('acc_hq', '-')!s:>10} {rb.get('acc_hq', '-')!s:>10} {ra.get('acc_lq', '-')!s:>10} {rb.get('acc_lq', '-')!s:>10}" + ("" if eq else "  DIFFERS"))
print(f"{same} of {len(a.keys() | b.keys())} cells have identical accuracies")
PY
