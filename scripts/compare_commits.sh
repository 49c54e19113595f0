#!/usr/bin/env bash
# Prove that two commits of cqd compute the same numbers: train the quick preset (Table 1, seed 0) and one tiny
# run each of fitnet, afd, feed (2 teachers), symcqd, prune + QAT, sr (lsfd) and sgn with both, fp32, 1 thread,
# and compare every value of every result.json and metrics.csv (cells, teachers, rounds) but timings and paths.
# The run list and the comparison are in scripts/compare_runs.py.
#
# Usage: bash scripts/compare_commits.sh [--fresh] [--new-src DIR] OLD_REV [NEW_REV]
#   NEW_REV     default: the working tree's src/ (copied when the script starts)
#   --new-src   the new side's cqd from DIR (a folder holding cqd/ or src/cqd/) instead; also NEW_SRC=DIR
#   --fresh     train the old side again even when ${OUT}/run-old can be reused
#   COMPARE_RUNS="feed sgn"   only these runs of the list (python scripts/compare_runs.py runs lists them)
# Each side runs from its own source tree (PYTHONPATH; both use the installed dependencies) into
# ${OUT:-/tmp/compare}/run-old and run-new, the two sides in parallel, OMP_NUM_THREADS=1 each.
# The old side is reused (not trained again) when run-old/.compare-marker says it was made from the same OLD
# commit, the same run list and the same installed dependencies, and every old run succeeded.
# Exit status: 0 when every run is identical in every compared value, 1 when any differs or any run failed.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
fresh=""; new_src=${NEW_SRC:-}; revs=()
while [ $# -gt 0 ]; do
  case $1 in
    --fresh) fresh=1 ;;
    --reuse-old) ;;  # the default
    --new-src) new_src=$2; shift ;;
    --new-src=*) new_src=${1#--new-src=} ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "compare_commits.sh: unknown option $1" >&2; exit 2 ;;
    *) revs+=("$1") ;;
  esac
  shift
done
[ ${#revs[@]} -ge 1 ] && [ ${#revs[@]} -le 2 ] || { sed -n '7,10p' "$0" >&2; exit 2; }
old=${revs[0]}; new=${revs[1]:-}
[ -z "$new" ] || [ -z "$new_src" ] || { echo "compare_commits.sh: give NEW_REV or --new-src, not both" >&2; exit 2; }
out=${OUT:-/tmp/compare}
py=python; command -v python >/dev/null || py=python3
runs="$repo/scripts/compare_runs.py"
old_hash=$(git rev-parse --verify "$old^{commit}")
t0=$(date +%s)

# the old side: reused when its marker matches, else trained again
want=$("$py" "$runs" marker "$old_hash")
reuse=""
if [ -z "$fresh" ] && [ -f "$out/run-old/.compare-marker" ] && [ "$(cat "$out/run-old/.compare-marker")" = "$want" ]; then
  reuse=1
  echo "reusing the old side in $out/run-old (made from $old_hash with the same run list and dependencies; --fresh trains it again)"
elif [ -z "$fresh" ] && [ -d "$out/run-old" ]; then
  echo "not reusing $out/run-old: its marker does not match $old_hash, this run list and these dependencies (or a run failed)"
fi
mkdir -p "$out"
if [ -n "$reuse" ]; then
  rm -rf "$out/run-new" "$out/work-new" "$out/cache-new" "$out/src-new" "$out/src-old"
else
  rm -rf "$out/run-old" "$out/run-new" "$out/work-old" "$out/work-new" "$out/cache-old" "$out/cache-new" \
         "$out/src-old" "$out/src-new"
fi

# the sources: $out/src-<side>/src/cqd
mkdir -p "$out/src-new"
if [ -z "$reuse" ]; then mkdir -p "$out/src-old"; git archive "$old_hash" src | tar -x -C "$out/src-old"; fi
if [ -n "$new_src" ]; then
  if [ -f "$new_src/src/cqd/__init__.py" ]; then new_src=$new_src/src
  elif [ ! -f "$new_src/cqd/__init__.py" ]; then echo "compare_commits.sh: $new_src holds neither cqd/ nor src/cqd/" >&2; exit 2; fi
  mkdir -p "$out/src-new/src"; cp -r "$new_src/cqd" "$out/src-new/src/"
  new_label="source folder $new_src"
elif [ -n "$new" ]; then
  git archive "$(git rev-parse --verify "$new^{commit}")" src | tar -x -C "$out/src-new"
  new_label="commit $(git rev-parse --short "$new^{commit}")"
else
  cp -r src "$out/src-new/"
  new_label="the working tree's src/"
fi
echo "old: commit $(git rev-parse --short "$old_hash"); new: $new_label; output: $out"

# train both sides at once (2 processes, 1 thread each); the old side marks itself reusable when all its runs succeed
pids=()
if [ -z "$reuse" ]; then
  "$py" "$runs" run "$out/run-old" "$out/src-old/src" --marker "$want" & pids+=($!)
fi
"$py" "$runs" run "$out/run-new" "$out/src-new/src" & pids+=($!)
for pid in "${pids[@]}"; do wait "$pid" || true; done
t1=$(date +%s)
echo "trained in $((t1 - t0)) s"

rc=0
"$py" "$runs" compare "$out/run-old" "$out/run-new" || rc=$?
echo "wall time $(( $(date +%s) - t0 )) s"
exit $rc
