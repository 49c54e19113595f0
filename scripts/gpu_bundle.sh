#!/usr/bin/env bash
# Packs what benchmarks/gpu_check.py needs on a GPU machine that lacks it, into the git-ignored folder .gpu_bundle/:
# wheels for CPython 3.12 on manylinux x86-64 (pydantic, kornia, lightning-fabric, tensorboard, pytest, hypothesis and
# their dependencies that such a machine lacks), and with --with-data the four Fashion-MNIST files (xz-compressed,
# to fit; gpu_check.py unpacks them). The folder must stay under 40 MiB; the script checks and reports its size.
#
# The GPU machine is assumed to have Python 3.12 with torch 2.11, torchvision, timm, PyYAML, tqdm, matplotlib,
# scikit-image (hence numpy, scipy, pillow) and onnxruntime (hence protobuf, maybe too old for tensorboard 2.21,
# which is why protobuf is bundled), and no internet. There, in the repository root, with .gpu_bundle/ carried along:
#
#     pip install --no-index --no-deps --target .gpu_bundle/site .gpu_bundle/*.whl
#     PYTHONPATH=src:.gpu_bundle/site python benchmarks/gpu_check.py --out gpu_check_out
#
# (--no-deps is needed: with --target pip ignores the installed packages and would look for torch, numpy, grpcio, ...
# among the bundle's wheels.) Run this script where pip can reach PyPI:
#
#     bash scripts/gpu_bundle.sh [--with-data] [--data-dir DIR] [--selftest]
#
#   --with-data     add Fashion-MNIST (for the check's `demo` case), from --data-dir or where cqd looks for it:
#                   /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist), then $CQD_CACHE or ~/.cache/cqd
#   --selftest      then check the bundle here: the same versions for this machine's Python installed into a
#                   temporary folder, every package the GPU machine lacks hidden unless it comes from there, and
#                   `gpu_check.py --device cpu --quick` plus the CUDA test file run that way
set -euo pipefail
cd "$(dirname "$0")/.."

BUNDLE=.gpu_bundle
LIMIT_MIB=40
# Pinned: the versions this repository's tests pass with, except kornia 0.8.2 + kornia_rs 0.1.9 (0.9.0 + 0.2.0 are
# 3.5 MB more) and pytest 8.3.5 (pytest >= 8.4 also needs pygments, 1.2 MB); all support torch 2.11 and Python 3.12.
WHEELS=(
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0
  kornia==0.8.2 kornia-rs==0.1.9
  lightning-fabric==2.6.6 lightning-utilities==0.15.3 packaging==26.2
  tensorboard==2.21.0 absl-py==2.5.1 protobuf==7.36.2
  pytest==8.3.5 pluggy==1.6.0 iniconfig==2.3.0
  hypothesis==6.155.2 sortedcontainers==2.4.0
)
# Import names of what the GPU machine lacks (--selftest hides these unless they come from the bundle).
ABSENT=pydantic,pydantic_core,annotated_types,typing_inspection,kornia,kornia_rs,lightning_fabric,lightning_utilities
ABSENT+=,lightning,tensorboard,tensorboard_data_server,absl,google,grpc,markdown,werkzeug,pytest,_pytest,py,pluggy
ABSENT+=,iniconfig,pygments,hypothesis,_hypothesis_pytestplugin,_hypothesis_ftz_detector,_hypothesis_globals
ABSENT+=,sortedcontainers,attr,attrs,optuna,torch_pruning,torchao,onnx,onnxscript,pandas,cv2,tensorboardX
FMNIST=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

with_data=""; data_dir=""; selftest=""
while [ $# -gt 0 ]; do
  case "$1" in
    --with-data) with_data=1 ;;
    --data-dir) data_dir="${2:?--data-dir needs a folder}"; with_data=1; shift ;;
    --selftest) selftest=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_bundle.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

py=python; command -v python >/dev/null || py=python3
mkdir -p "$BUNDLE"
rm -rf "$BUNDLE"/*.whl "$BUNDLE/site"  # site/: an install made here would not fit the carry limit
[ -n "$with_data" ] || rm -rf "$BUNDLE/fashion-mnist"
echo "gpu_bundle: downloading ${#WHEELS[@]} wheels for CPython 3.12 manylinux x86-64 into $BUNDLE/"
"$py" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$BUNDLE" "${WHEELS[@]}" 2> >(grep -v "^WARNING: Location" >&2)
got=$(ls "$BUNDLE"/*.whl | wc -l)
[ "$got" -eq "${#WHEELS[@]}" ] || { echo "gpu_bundle: error: expected ${#WHEELS[@]} wheels, got $got" >&2; exit 1; }

if [ -n "$with_data" ]; then
  src=""
  cache="${CQD_CACHE:-$HOME/.cache/cqd}"
  for d in ${data_dir:+"$data_dir"} /usr/share/datasets/fashion-mnist "$cache" "$cache/FashionMNIST/raw"; do
    ok=1
    for s in "${FMNIST[@]}"; do [ -f "$d/$s.gz" ] || [ -f "$d/$s" ] || ok=""; done
    if [ -n "$ok" ]; then src="$d"; break; fi
  done
  [ -n "$src" ] || { echo "gpu_bundle: error: Fashion-MNIST not found (${data_dir:-/usr/share/datasets/fashion-mnist, $cache}); install dataset-fashion-mnist or pass --data-dir DIR" >&2; exit 1; }
  mkdir -p "$BUNDLE/fashion-mnist"
  echo "gpu_bundle: Fashion-MNIST from $src, compressed with xz -9e (gzip would not fit in ${LIMIT_MIB} MiB; a minute or two)"
  for s in "${FMNIST[@]}"; do
    out="$BUNDLE/fashion-mnist/$s.xz"
    if [ -f "$out" ] && [ "$out" -nt "$src" ] && "$py" -c 'import lzma, sys; lzma.open(sys.argv[1]).read()' "$out" 2>/dev/null; then
      echo "    kept $out (made earlier from the same folder)"; continue
    fi
    if [ -f "$src/$s.gz" ]; then reader=(gzip -dc "$src/$s.gz"); else reader=(cat "$src/$s"); fi
    if command -v xz >/dev/null; then
      "${reader[@]}" | xz -9e -T1 -c > "$out.part"
    else
      "${reader[@]}" | "$py" -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1], "wb", preset=9 | lzma.PRESET_EXTREME) as f:
    shutil.copyfileobj(sys.stdin.buffer, f)' "$out.part"
    fi
    mv "$out.part" "$out"
  done
  cat > "$BUNDLE/fashion-mnist/README" <<'EOF'
Fashion-MNIST, the four IDX files xz-compressed. benchmarks/gpu_check.py unpacks them by itself; for cqd's own commands
unpack them first (`xz -dk .gpu_bundle/fashion-mnist/*.xz`; cqd reads raw IDX files) and pass
--data-dir .gpu_bundle/fashion-mnist (data.root; base.data.root in a grid).
EOF
fi

bytes=$(du -sb "$BUNDLE" | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "gpu_bundle: $BUNDLE/ holds:"
(cd "$BUNDLE" && ls -l *.whl fashion-mnist/* 2>/dev/null | awk '{ printf "    %9.2f MiB  %s\n", $5 / 1048576, $9 }')
echo "gpu_bundle: size $mib MiB (limit $LIMIT_MIB MiB)"
if [ "$bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "gpu_bundle: error: $BUNDLE/ is over $LIMIT_MIB MiB" >&2
  exit 1
fi

if [ -n "$selftest" ]; then
  tmp=$(mktemp -d /tmp/gpu_bundle_selftest.XXXXXX)
  trap 'rm -rf "$tmp"' EXIT
  echo "gpu_bundle: selftest in $tmp (same versions, for this machine's Python $("$py" -c 'import platform; print(platform.python_version())'))"
  "$py" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps -d "$tmp/wheels" "${WHEELS[@]}" \
    2> >(grep -v "^WARNING: Location" >&2)
  "$py" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$tmp/site" "$tmp"/wheels/*.whl
  # This machine's site-packages seen through a folder of links that leaves out what the GPU machine lacks
  # (packages and their .dist-info); sitecustomize.py puts it in place of the real one in every Python started.
  "$py" - "$tmp" "$ABSENT" <<'EOF'
import os, site, sys
from pathlib import Path

tmp, absent = Path(sys.argv[1]), set(sys.argv[2].split(","))
pairs = []
for i, sp in enumerate(p for p in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(p)):
    view = tmp / f"view{i}"
    view.mkdir(parents=True)
    for entry in Path(sp).iterdir():
        if entry.name.endswith((".dist-info", ".egg-info")):
            record = next((entry / n for n in ("RECORD", "top_level.txt", "SOURCES.txt") if (entry / n).is_file()), None)
            tops = {line.split(",")[0].split("/")[0].split(".")[0] for line in record.read_text().splitlines()} if record else set()
            if tops & absent:
                continue
        elif entry.name.split(".")[0] in absent:
            continue
        (view / entry.name).symlink_to(entry)
    pairs.append(f"{sp}={view}")
(tmp / "shim").mkdir()
(tmp / "shim" / "views").write_text("\n".join(pairs))
EOF
  cat > "$tmp/shim/sitecustomize.py" <<'EOF'
# gpu_bundle.sh --selftest: this machine's site-packages without the packages the GPU machine lacks.
import os, sys

_views = dict(line.split("=", 1) for line in open(os.path.join(os.path.dirname(__file__), "views")).read().splitlines())
sys.path[:] = [_views.get(p, p) for p in sys.path]
EOF
  export OMP_NUM_THREADS=1
  export PYTHONPATH="$tmp/shim:src:$tmp/site"
  "$py" -c 'import sys, kornia, pydantic, lightning_fabric, pytest
for m in (kornia, pydantic, lightning_fabric, pytest):
    assert m.__file__.startswith(sys.argv[1]), m.__file__
print("gpu_bundle: selftest imports come from the bundle:", kornia.__version__, pydantic.__version__, lightning_fabric.__version__, pytest.__version__)' "$tmp/site"
  "$py" benchmarks/gpu_check.py --device cpu --quick --out "$tmp/out" | grep '^\[' || true
  "$py" benchmarks/gpu_check.py --device cpu --quick --only cuda_tests --out "$tmp/out_tests" | grep '^\[' || true
  "$py" -c 'import json, sys
bad = [c["name"] + ": " + c["reason"] for d in sys.argv[1:] for c in json.load(open(d + "/gpu_check.json"))["cases"] if c["status"] == "failed"]
print("gpu_bundle: selftest: every case ok or skipped" if not bad else "gpu_bundle: selftest FAILED:\n  " + "\n  ".join(bad))
sys.exit(1 if bad else 0)' "$tmp/out" "$tmp/out_tests"
  echo "gpu_bundle: selftest: the CUDA test file's CPU cases with the bundled versions (pytest tests/test_degradations.py)"
  rc=0; "$py" -m pytest tests/test_degradations.py -q -p no:cacheprovider -p no:warnings -o addopts= > "$tmp/pytest.log" 2>&1 || rc=$?
  tail -1 "$tmp/pytest.log"
  [ "$rc" -eq 0 ] || { tail -40 "$tmp/pytest.log"; echo "gpu_bundle: selftest FAILED (pytest exited $rc; the bundle is kept)" >&2; exit 1; }
fi

cat <<EOF

gpu_bundle: done. Carry .gpu_bundle/ along with the checkout (git ignores it), then on the GPU machine, in the repository root:
    pip install --no-index --no-deps --target .gpu_bundle/site .gpu_bundle/*.whl
    PYTHONPATH=src:.gpu_bundle/site python benchmarks/gpu_check.py --out gpu_check_out
EOF
