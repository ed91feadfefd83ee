#!/usr/bin/env bash
# The GPU check of docs/gpu.md, for any machine with PyTorch and a CUDA GPU, offline: the CUDA tests,
# CLI training and testing on a real subset (fp32, bf16, and the CPU beside them when time allows),
# the paper's Table 6 speeds and the seconds per training epoch, all in ONE markdown report.
#
#   bash benchmarks/gpu_check.sh                                          # the check (~5 min, one H200)
#   bash benchmarks/gpu_check.sh --make-subset ../shared/data/magnetic_tile [TRAIN TEST]
#       builds .gpu-data/magnetic_tile: the first TRAIN (300) train images, TEST (40) test images
#       (half good, half spread over the defect types) with their masks
#
# Report: $OUT/gpu_check.md when OUT is set, else runs/gpu_check.md (speed.json beside it); exits 1
# when a step failed, after writing what it has. Wheels in .whl/ are installed first (offline).
# Environment: GPU_CHECK_DEVICE (cuda; cpu rehearses it here), GPU_CHECK_QUICK=1 (tiny settings),
# GPU_CHECK_DATA (.gpu-data), GPU_CHECK_DEADLINE_S (450: no step runs past it, so it ends within 8 min).
set -uo pipefail
cd "$(dirname "$0")/.."

DATA=${GPU_CHECK_DATA:-.gpu-data}
CATEGORY=magnetic_tile

# pick DIR N: N file names of DIR spread evenly over its sorted listing
pick() {
    local all
    all=$(ls "$1" | wc -l)
    ls "$1" | sort | awk -v step=$((all / $2 > 1 ? all / $2 : 1)) '(NR - 1) % step == 0' | head -n "$2"
}

if [[ ${1:-} == --make-subset ]]; then
    src=${2:?usage: gpu_check.sh --make-subset MVTEC_ROOT [TRAIN TEST]}/$CATEGORY
    ntrain=${3:-300} ntest=${4:-40}
    dst=$DATA/$CATEGORY
    rm -rf "$dst" && mkdir -p "$dst/train/good" || exit 1
    ls "$src/train/good" | sort | head -n "$ntrain" | while read -r f; do
        cp "$src/train/good/$f" "$dst/train/good/"
    done
    types=$(ls "$src/test" | grep -vx good)
    per=$(( (ntest - ntest / 2) / $(wc -w <<<"$types") ))
    for t in good $types; do
        mkdir -p "$dst/test/$t"
        [[ $t == good ]] || mkdir -p "$dst/ground_truth/$t"
        pick "$src/test/$t" $([[ $t == good ]] && echo $((ntest / 2)) || echo $((per > 0 ? per : 1))) |
            while read -r f; do
                cp "$src/test/$t/$f" "$dst/test/$t/"
                [[ $t == good ]] || cp "$src/ground_truth/$t/${f%.*}_mask.png" "$dst/ground_truth/$t/"
            done
    done
    echo "$dst: $(find "$dst/train" -type f | wc -l) train, $(find "$dst/test" -type f | wc -l) test images," \
        "$(find "$dst/ground_truth" -type f | wc -l) masks; $(du -sh "$DATA" | cut -f1) in $DATA"
    exit 0
fi

DEVICE=${GPU_CHECK_DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
DEADLINE=${GPU_CHECK_DEADLINE_S:-450}
REPORT=${OUT:+$OUT/gpu_check.md}
REPORT=${REPORT:-runs/gpu_check.md}
WORK=runs/gpu_check
FAILED=()
mkdir -p "$(dirname "$REPORT")" && rm -rf "$WORK" && mkdir -p "$WORK" || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then  # packages the machine lacks, carried as wheels
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl
    then export PYTHONPATH=/tmp/site:$PYTHONPATH
    else FAILED+=("install .whl")
    fi
fi
printf '# GPU check, %s\n\nDevice `%s`, data `%s/%s`, quick=%s; each step: status and wall time.\n' \
    "$(date -u '+%Y-%m-%d %H:%M UTC')" "$DEVICE" "$DATA" "$CATEGORY" "$QUICK" >"$REPORT"

# step NAME LIMIT_S [--raw] CMD...: runs CMD for at most LIMIT_S seconds, and never past the deadline, shows
# its output and adds it to the report: as it is with --raw (markdown tables; stderr only on failure), else fenced.
step() {
    local name=$1 limit=$2 raw=0 left=$((DEADLINE - SECONDS)) t0=$SECONDS rc status
    shift 2
    [[ $1 == --raw ]] && raw=1 && shift
    if ((left < 15)); then
        FAILED+=("$name (not run: past the deadline)")
        printf '\n## %s: not run, past the %s s deadline\n' "$name" "$DEADLINE" >>"$REPORT"
        return 1
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit} s)" >&2
    if ((raw)); then
        timeout "$limit" "$@" 2> >(tee "$WORK/stderr" >&2) | tee "$WORK/stdout"
    else
        timeout "$limit" "$@" 2>&1 | tee "$WORK/stdout"
    fi
    rc=${PIPESTATUS[0]}
    status=ok
    ((rc == 124)) && status="TIMED OUT after $limit s"
    ((rc != 0 && rc != 124)) && status="FAILED (exit $rc)"
    ((rc != 0)) && FAILED+=("$name")
    printf '\n## %s: %s, %s s\n\n' "$name" "$status" $((SECONDS - t0)) >>"$REPORT"
    if ((raw)); then
        cat "$WORK/stdout" >>"$REPORT"
        ((rc == 0)) || printf '\n```text\n%s\n```\n' "$(tail -n 40 "$WORK/stderr")" >>"$REPORT"
    else
        printf '```text\n%s\n```\n' "$(tail -n 150 "$WORK/stdout")" >>"$REPORT"
    fi
    return "$rc"
}

# cli NAME DEVICE PRECISION: `cflow-ad train` (with $CLI_FLAGS) and `test` on the subset; wall seconds to
# $WORK/NAME/wall
cli() {
    local dir=$WORK/$1 t0=$SECONDS
    # CLI_FLAGS unquoted: it holds several flags
    python3 -m cflow_ad --quiet train --data "$DATA" --category "$CATEGORY" --output "$dir" \
        --device "$2" --precision "$3" $CLI_FLAGS &&
        python3 -m cflow_ad --quiet test --model "$dir/model.safetensors" --data "$DATA" --category "$CATEGORY" \
            --output "$dir/test" --device "$2" --precision "$3" &&
        echo $((SECONDS - t0)) >"$dir/wall"
}
export -f cli
CLI_FLAGS= SPEED=() TRAIN_SPEED=(--precisions fp32 bf16)
if ((QUICK)); then
    CLI_FLAGS="--epochs 1 --sub-epochs 1"
    SPEED=(--encoders resnet18 --sizes 256 --batches 1 --repeats 1 --b1-calls 1 --warmup 1)
    TRAIN_SPEED=(--precisions fp32 --configs default --images 8 --epochs 2)
fi
export WORK DATA CATEGORY CLI_FLAGS

step "machine and versions" 60 bash -c 'if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "no nvidia-smi"; fi
python3 - "$1" <<"EOF"
import sys, platform, numpy, onnxruntime, sklearn, torch, torchvision
import cflow_ad
from cflow_ad.device import Compute, available_cores, cuda_count
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}),"
      f" torchvision {torchvision.__version__}, numpy {numpy.__version__}, onnxruntime {onnxruntime.__version__},"
      f" scikit-learn {sklearn.__version__}")
print(f"cflow_ad from {cflow_ad.__file__}; {cuda_count()} CUDA device(s), {available_cores()} cores;"
      f" --device {sys.argv[1]} is {Compute(sys.argv[1]).describe()}")
EOF' _ "$DEVICE"
step "CUDA tests (pytest -m cuda tests/test_cuda.py)" 240 \
    python3 -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider
if [[ -d $DATA/$CATEGORY ]]; then
    step "CLI train + test, $DEVICE fp32" 120 bash -c 'cli "$@"' _ "$DEVICE-fp32" "$DEVICE" fp32
    step "CLI train + test, $DEVICE bf16" 120 bash -c 'cli "$@"' _ "$DEVICE-bf16" "$DEVICE" bf16
else
    FAILED+=("data")
    printf '\n## CLI train + test: FAILED, no %s: build it with --make-subset\n' "$DATA/$CATEGORY" >>"$REPORT"
fi
step "speed (Table 6): benchmarks/speed.py --device $DEVICE ${SPEED[*]}" 180 --raw \
    python3 benchmarks/speed.py --device "$DEVICE" "${SPEED[@]}" --json "$(dirname "$REPORT")/speed.json"
step "training speed: benchmarks/train_speed.py --device $DEVICE ${TRAIN_SPEED[*]}" 150 --raw \
    python3 benchmarks/train_speed.py --device "$DEVICE" --data "$DATA" --category "$CATEGORY" "${TRAIN_SPEED[@]}"
RUNS=("$DEVICE-fp32" "$DEVICE-bf16")
if [[ $DEVICE != cpu && -d $DATA/$CATEGORY ]]; then  # the same subset on the CPU, if time allows
    if ((DEADLINE - SECONDS >= 150)); then
        step "CLI train + test, cpu fp32 (for comparison)" 150 bash -c 'cli "$@"' _ cpu-fp32 cpu fp32
        RUNS+=(cpu-fp32)
    else
        printf '\n## CLI train + test, cpu fp32: skipped, under 150 s left\n' >>"$REPORT"
    fi
fi
step "metrics of the CLI runs" 60 --raw python3 - "$WORK" "${RUNS[@]}" <<'EOF'
import json, sys
from pathlib import Path
from cflow_ad.checkpoint import read_metadata

work = Path(sys.argv[1])
print("| run | device | image AUROC | pixel AUROC | AUPRO | train s | test s | train + test wall s |")
print("|---|---|---|---|---|---|---|---|")
for name in sys.argv[2:]:
    folder = work / name
    if not (folder / "wall").is_file():
        print(f"| {name} | failed or not run | | | | | | |")
        continue
    m = json.loads((folder / "test" / "metrics.json").read_text())
    h = read_metadata(folder / "model.safetensors")["extra"]["history"]
    wall = (folder / "wall").read_text().strip()
    print(f"| {name} | {m['device']} | {100 * m['image_auroc']:.2f} | {100 * m['pixel_auroc']:.2f}"
          f" | {100 * m['aupro']:.2f} | {h['train_seconds']:.1f} | {m['seconds']:.1f} | {wall} |")
EOF

if ((${#FAILED[@]})); then
    printf '\n## Result: FAILED after %s s: %s\n' "$SECONDS" "$(IFS=';'; echo "${FAILED[*]}")" | tee -a "$REPORT"
    exit 1
fi
printf '\n## Result: all steps passed in %s s\n' "$SECONDS" | tee -a "$REPORT"
