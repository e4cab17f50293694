#!/usr/bin/env bash
# Prepare .whl/ (at the repository root, ignored by git) for benchmarks/device/run.sh on a GPU machine that has
# torch, torchvision and the common packages (numpy, opencv, matplotlib, tensorboard, tqdm, pyyaml, pillow, scipy,
# timm) but no package registry: wheels of everything else wrn-det and its detectron2 engine import, for CPython
# 3.12 manylinux x86-64 (the GPU machine's Python), plus detectron2 itself as a pure-Python wheel (without its
# compiled _C: Faster R-CNN runs on torchvision's RoIAlign and NMS, and detectron2 falls back to pycocotools'
# COCOeval without it). Runs here, where the registries are reachable; at most 64 MiB.
#
#     bash benchmarks/device/prepare.sh                 # D2SRC=/path/to/detectron2 checkout (default /work/d2src)
#     WHL_PYTHONS="3.12 3.11" bash benchmarks/device/prepare.sh   # also this machine's Python (the --smoke test here)
#
# It writes .whl/requirements.txt: the names run.sh installs with `pip install --no-index --find-links .whl`,
# which picks each package's wheel for the Python that installs it (one version of each, per Python).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHL=.whl
D2SRC=${D2SRC:-/work/d2src}
local_py=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYTHONS=${WHL_PYTHONS:-3.12 $local_py}
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# compiled: one wheel per Python
BINARY="pycocotools==2.0.11 faster-coco-eval==1.8.0"
# pure Python wheels (py3-none-any); the GPU image lacks them, or a bare venv does
PURE="iopath==0.1.9 yacs==0.1.8 termcolor==3.3.0 tabulate==0.10.0 portalocker==4.4.2 omegaconf==2.3.1
      cloudpickle==3.1.3"
# only source distributions on the registry: built into pure Python wheels here
SDIST="fvcore==0.1.5.post20221221 antlr4-python3-runtime==4.9.3"

rm -rf "$WHL"
mkdir -p "$WHL"
quiet() { grep -v -e "^WARNING: Location" -e "^$" || true; }
for v in $(echo "$PYTHONS" | tr ' ' '\n' | sort -u); do
    echo "== compiled wheels for CPython $v"
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" --implementation cp $PLATFORMS \
        -d "$WHL" $BINARY 2>&1 | quiet
done
echo "== pure Python wheels"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WHL" $PURE 2>&1 | quiet
echo "== built from source distributions"
# shellcheck disable=SC2086
"$PY" -m pip wheel -q --no-deps -w "$WHL" $SDIST 2>&1 | quiet
if [ -d "$D2SRC/detectron2" ]; then
    echo "== detectron2 from $D2SRC, pure Python"
    "$PY" benchmarks/device/d2_wheel.py "$D2SRC" "$WHL"
else
    echo "== no detectron2 checkout at $D2SRC (D2SRC=...): run.sh will run the builtin engine alone"
fi
# what run.sh installs: every distribution here, by name
"$PY" - "$WHL" <<'PYEOF'
import os, re, sys
whl = sys.argv[1]
names = sorted({re.split(r"-\d", f, 1)[0].replace("_", "-").lower() for f in os.listdir(whl) if f.endswith(".whl")})
with open(os.path.join(whl, "requirements.txt"), "w") as f:
    f.write("\n".join(names) + "\n")
print("packages:", " ".join(names))
PYEOF
size=$(du -sm "$WHL" | cut -f1)
ls -la "$WHL"
echo "== $WHL: ${size} MiB"
if [ "$size" -gt 64 ]; then
    echo "error: $WHL is ${size} MiB, over the 64 MiB a device call carries" >&2
    exit 1
fi
