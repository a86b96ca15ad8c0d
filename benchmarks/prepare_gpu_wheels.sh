#!/usr/bin/env bash
# Prepare .gpu/ for benchmarks/gpu_suite.sh: run HERE (a machine that reaches PyPI), from the repo root.
#
#   bash benchmarks/prepare_gpu_wheels.sh
#
# The lent GPU machine has no network and sees only the working tree (plus carried ignored
# folders, 64 MiB in all), so this puts into .gpu/ (ignored by .gitignore, carried with
# carry [".gpu"]):
#
#   .gpu/wheels/          Python 3.12 x86-64 wheels of fastmaml's runtime and test dependencies, one
#                         version each, no torch/numpy (the machine has them). gpu_suite.sh installs
#                         only those whose distribution is missing there; the machine's image already
#                         lists most of them (device KINDS.md), higher is the one it lacks.
#   .gpu/data/omniglot/   the Omniglot zips (images_background.zip, images_evaluation.zip) from
#                         $OMNIGLOT_SRC (default /work/shared/data/omniglot), which the machine cannot see.
#
# Not fetched: learn2learn (an sdist that needs compiling; compare.py runs its re-implementation,
# --learn2learn reimpl), gymnasium/mujoco (the suite runs no RL test), and tensorboard's server-side
# needs (grpcio, werkzeug, markdown, tensorboard-data-server): torch.utils.tensorboard.SummaryWriter,
# which fastmaml.runs opens in every training run, imports only tensorboard, absl-py, protobuf,
# numpy and six (checked by blocking the others' imports).
set -euo pipefail

cd "$(git rev-parse --show-toplevel)"
OMNIGLOT_SRC=${OMNIGLOT_SRC:-/work/shared/data/omniglot}
DEST=.gpu
LIMIT_MIB=${LIMIT_MIB:-56}   # the whole travelling tree is limited to 64 MiB; the tracked files take ~6

# Pinned to the versions installed and tested beside torch 2.13 here; all have cp312 / py3 wheels.
WHEELS=(
  pyyaml==6.0.3 tqdm==4.70.1
  matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1
  packaging==26.2 pyparsing==3.3.2 python-dateutil==2.9.0.post0 six==1.17.0 pillow==13.0.0
  tensorboard==2.21.0 absl-py==2.5.1 protobuf==7.36.2
  pytest==9.0.3 iniconfig==2.3.0 pluggy==1.6.0 pygments==2.20.0
  higher==0.2.1
)

mkdir -p "$DEST/wheels" "$DEST/data/omniglot"
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$DEST/wheels" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any \
  "${WHEELS[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

# One version per distribution: a wheel left from an earlier run with another pin would make pip refuse.
python3 - "$DEST/wheels" <<'EOF'
import collections, pathlib, re, sys
seen = collections.defaultdict(list)
for wheel in pathlib.Path(sys.argv[1]).glob("*.whl"):
    seen[re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()].append(wheel.name)
dupes = {k: v for k, v in seen.items() if len(v) > 1}
if dupes:
    sys.exit(f"several versions of one distribution in {sys.argv[1]}: {dupes}; delete the stale ones")
EOF

for zip in images_background.zip images_evaluation.zip; do
  cp -f "$OMNIGLOT_SRC/$zip" "$DEST/data/omniglot/$zip"
  chmod u+w "$DEST/data/omniglot/$zip"
done

git check-ignore -q "$DEST" || { echo "ERROR: $DEST is not git-ignored (add /.gpu/ to .gitignore)" >&2; exit 1; }
ls -l "$DEST/wheels" "$DEST/data/omniglot"
SIZE_KIB=$(du -sk "$DEST" | cut -f1)
echo "$DEST: $((SIZE_KIB / 1024)) MiB ($(ls "$DEST"/wheels/*.whl | wc -l) wheels + Omniglot zips)"
if (( SIZE_KIB > LIMIT_MIB * 1024 )); then
  echo "ERROR: $DEST is over ${LIMIT_MIB} MiB; with the tracked files it would not fit the 64 MiB tree limit" >&2
  exit 1
fi
