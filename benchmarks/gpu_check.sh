#!/usr/bin/env bash
# The GPU check of docs/gpu.md, for any machine with PyTorch and a CUDA GPU, offline: a real-subset training
# and test in fp32, the paper's Table 6 speeds, the CUDA tests, bf16 and its threshold shift, the baselines,
# predict / calibrate / paper mode / onnxruntime on CUDA and the seconds per training epoch, all in ONE
# markdown report. benchmarks/gpu_prepare.sh builds what it reads (.whl/, .gpu-data/).
#
#   bash benchmarks/gpu_check.sh        # at most 5 min (one H100 or H200)
#
# Report: $OUT/gpu_check.md when OUT is set, else runs/gpu_check.md (speed.json beside it); exits 1
# when a step failed, after writing what it has. Wheels in .whl/ are installed first (offline).
# Environment: GPU_CHECK_DEVICE (cuda; cpu rehearses it here), GPU_CHECK_QUICK=1 (tiny settings),
# GPU_CHECK_DATA (.gpu-data), GPU_CHECK_DEADLINE_S (280: no step runs past it; the last table follows,
# so the check ends within 5 min), GPU_CHECK_SCALE (1: each step's limit is multiplied by it).
set -uo pipefail
cd "$(dirname "$0")/.."

DATA=${GPU_CHECK_DATA:-.gpu-data}
CATEGORY=magnetic_tile

DEVICE=${GPU_CHECK_DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
DEADLINE=${GPU_CHECK_DEADLINE_S:-280}
SCALE=${GPU_CHECK_SCALE:-1}  # each step's own limit times this (a CPU rehearsal needs more)
REPORT=${OUT:+$OUT/gpu_check.md}
REPORT=${REPORT:-runs/gpu_check.md}
WORK=runs/gpu_check
FAILED=()
mkdir -p "$(dirname "$REPORT")" && rm -rf "$WORK" && mkdir -p "$WORK" || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then  # packages the machine lacks, carried as wheels
    SITE=$WORK/site  # inside the run folder: no path of any one machine
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl
    then export PYTHONPATH=$PWD/$SITE:$PYTHONPATH
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
    limit=$((limit * SCALE))
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

# cli NAME DEVICE PRECISION FLOW_PRECISION [TRAIN FLAGS...]: `cflow-ad train` (with $CLI_FLAGS and the flags) and
# `test` on the subset; wall seconds to $WORK/NAME/wall
cli() {
    local dir=$WORK/$1 t0=$SECONDS
    local compute=(--device "$2" --precision "$3" --flow-precision "$4")
    shift 4
    # CLI_FLAGS unquoted: it holds several flags
    python3 -m cflow_ad --quiet train --data "$DATA" --category "$CATEGORY" --output "$dir" "${compute[@]}" \
        $CLI_FLAGS "$@" &&
        python3 -m cflow_ad --quiet test --model "$dir/model.safetensors" --data "$DATA" --category "$CATEGORY" \
            --output "$dir/test" "${compute[@]}" &&
        echo $((SECONDS - t0)) >"$dir/wall"
}

# deploy DEVICE: the fp32 model through predict (a folder of images: overlays, masks, CSV, JSON), paper mode,
# calibrate --precision bf16 (the thresholds refitted in bf16, their shift from fp32's printed), and export +
# onnxruntime's CUDA provider (skipped, and said so, when this onnxruntime has none)
deploy() {
    local dir=$WORK/$1-fp32 device=$1 images=$DATA/$CATEGORY/test
    set -e
    python3 -m cflow_ad --quiet predict --model "$dir/model.safetensors" --output "$WORK/predict" --device "$device" \
        "$images"
    python3 -m cflow_ad --quiet predict --model "$dir/model.safetensors" --output "$WORK/predict-paper" \
        --device "$device" --normalization paper --no-overlays "$images"
    python3 -m cflow_ad --quiet calibrate --model "$dir/model.safetensors" --output "$WORK/bf16.safetensors" \
        --normal-dir "$images/good" --device "$device" --precision bf16
    python3 -m cflow_ad --quiet calibrate --model "$dir/model.safetensors" --output "$WORK/fp32.safetensors" \
        --normal-dir "$images/good" --device "$device" --precision fp32
    python3 - "$WORK" <<'EOF'
import csv, json, sys
from pathlib import Path
from cflow_ad.checkpoint import read_metadata

work = Path(sys.argv[1])
for name in ("predict", "predict-paper"):
    rows = list(csv.DictReader(open(work / name / "predictions.csv", encoding="utf-8")))
    pngs = len(list((work / name).rglob("*.png")))
    labels = sorted({r["label"] for r in rows})
    print(f"{name}: {len(rows)} images scored, {pngs} PNGs, labels {labels}")
    assert rows and not any(r["error"] for r in rows), f"{name}: an image failed"
fp32, bf16 = (read_metadata(work / f"{p}.safetensors") for p in ("fp32", "bf16"))
assert fp32["precision"] == "fp32" and bf16["precision"] == "bf16"
print("thresholds refitted on the same good images, bf16 against fp32 (issue 34, finding 4):")
for key, value in fp32["thresholds"].items():
    other = bf16["thresholds"].get(key)
    if key != "target_fpr" and isinstance(value, float) and isinstance(other, float) and value:
        print(f"  {key}: fp32 {value:.5g}, bf16 {other:.5g} ({100 * (other / value - 1):+.2f}%)")
EOF
    if python3 -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'
    then
        python3 -m cflow_ad --quiet export --model "$dir/model.safetensors" --output "$WORK/model.onnx"
        python3 -m cflow_ad --quiet test --model "$WORK/model.onnx" --data "$DATA" --category "$CATEGORY" \
            --output "$WORK/onnx-test" --device "$device"
        python3 -c 'import json, sys; m = json.load(open(sys.argv[1])); print("onnxruntime:", m["device"],
                    "image AUROC", m["image_auroc"]); assert m["device"] == "CUDAExecutionProvider"' \
            "$WORK/onnx-test/metrics.json"
    else
        echo "onnxruntime: no CUDA execution provider in this onnxruntime: its CUDA run skipped"
    fi
}
export -f cli deploy
CLI_FLAGS= SPEED=(--repeats 3 --b1-calls 10 --warmup 2) TRAIN_SPEED=(--precisions fp32 bf16/bf16 --epochs 3)
FIBERS=(--fiber-batches 2048 8192 32768 --images 64 --repeats 1)  # the default, the paper's, larger: is a GPU faster?
if ((QUICK)); then
    CLI_FLAGS="--epochs 1 --sub-epochs 1 --min-steps 0"
    SPEED=(--encoders resnet18 --sizes 256 --batches 1 --repeats 1 --b1-calls 1 --warmup 1)
    TRAIN_SPEED=(--precisions fp32 --configs default --images 8 --epochs 2)
    FIBERS=(--fiber-batches 256 2048 --images 8 --repeats 1)
fi
export WORK DATA CATEGORY CLI_FLAGS

step "machine and versions" 30 bash -c 'if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "no nvidia-smi"; fi
python3 - "$1" <<"EOF"
import sys, platform, numpy, onnxruntime, sklearn, torch, torchvision
import cflow_ad
from cflow_ad.device import Compute, available_cores, cuda_count
providers = ", ".join(onnxruntime.get_available_providers())
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}),"
      f" torchvision {torchvision.__version__}, numpy {numpy.__version__}, onnxruntime {onnxruntime.__version__}"
      f" ({providers}), scikit-learn {sklearn.__version__}")
print(f"cflow_ad from {cflow_ad.__file__}; {cuda_count()} CUDA device(s), {available_cores()} cores;"
      f" --device {sys.argv[1]} is {Compute(sys.argv[1]).describe()}")
EOF' _ "$DEVICE"
HAVE_DATA=0
[[ -d $DATA/$CATEGORY ]] && HAVE_DATA=1
if ((HAVE_DATA)); then
    step "CLI train + test, $DEVICE fp32" 50 bash -c 'cli "$@"' _ "$DEVICE-fp32" "$DEVICE" fp32 fp32
else
    FAILED+=("data")
    printf '\n## CLI train + test: FAILED, no %s: build it with benchmarks/gpu_prepare.sh\n' "$DATA/$CATEGORY" \
        >>"$REPORT"
fi
step "speed (Table 6): benchmarks/speed.py --device $DEVICE ${SPEED[*]}" 60 --raw \
    python3 benchmarks/speed.py --device "$DEVICE" "${SPEED[@]}" --json "$(dirname "$REPORT")/speed.json"
step "CUDA tests (pytest -m cuda tests/test_cuda.py)" 90 \
    python3 -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider
RUNS=("$DEVICE-fp32")
if ((HAVE_DATA)); then
    step "CLI train + test, $DEVICE bf16 (encoder and flows)" 35 bash -c 'cli "$@"' _ "$DEVICE-bf16" "$DEVICE" bf16 bf16
    RUNS+=("$DEVICE-bf16")
    for method in padim patchcore spade; do
        step "CLI train + test, $DEVICE $method" 20 bash -c 'cli "$@"' _ "$DEVICE-$method" "$DEVICE" fp32 fp32 \
            --method "$method"
        RUNS+=("$DEVICE-$method")
    done
    if [[ -f $WORK/$DEVICE-fp32/model.safetensors ]]; then
        step "predict, paper mode, calibrate in bf16, onnxruntime on $DEVICE" 40 bash -c 'deploy "$@"' _ "$DEVICE"
    fi
fi
step "training speed: benchmarks/train_speed.py --device $DEVICE ${TRAIN_SPEED[*]}" 30 --raw \
    python3 benchmarks/train_speed.py --device "$DEVICE" --data "$DATA" --category "$CATEGORY" "${TRAIN_SPEED[@]}"
step "fiber batch per step: benchmarks/train_speed.py --device $DEVICE ${FIBERS[*]}" 25 --raw \
    python3 benchmarks/train_speed.py --device "$DEVICE" --data "$DATA" --category "$CATEGORY" "${FIBERS[@]}"
if [[ $DEVICE != cpu ]] && ((HAVE_DATA)); then  # the same subset on the CPU, if time allows
    if ((DEADLINE - SECONDS >= 60)); then
        step "CLI train + test, cpu fp32 (for comparison)" 60 bash -c 'cli "$@"' _ cpu-fp32 cpu fp32 fp32
        RUNS+=(cpu-fp32)
    else
        printf '\n## CLI train + test, cpu fp32: skipped, under 60 s left\n' >>"$REPORT"
    fi
fi
# the table of what ran, past the deadline if need be (it reads files: seconds)
DEADLINE=$((SECONDS + 30)) step "metrics of the CLI runs" 30 --raw python3 - "$WORK" "${RUNS[@]}" <<'EOF'
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
    auc = {k: "n/a" if m[k] is None else f"{100 * m[k]:.2f}" for k in ("image_auroc", "pixel_auroc", "aupro")}
    print(f"| {name} | {m['device']} | {auc['image_auroc']} | {auc['pixel_auroc']} | {auc['aupro']}"
          f" | {h['train_seconds']:.1f} | {m['seconds']:.1f} | {wall} |")
EOF

if ((${#FAILED[@]})); then
    printf '\n## Result: FAILED after %s s: %s\n' "$SECONDS" "$(IFS=';'; echo "${FAILED[*]}")" | tee -a "$REPORT"
    exit 1
fi
printf '\n## Result: all steps passed in %s s\n' "$SECONDS" | tee -a "$REPORT"
