#!/usr/bin/env bash
# Every GPU check of the performance issue in one prepared run, sized for a short GPU lease.
#
#   bash benchmarks/device_check.sh [--out DIR] [--data-dir DIR] [--budget-s S] [--only a,b]
#                                   [--pack] [--device cuda]
#
# Runs from the repository root with whatever python3 holds a CUDA build of torch (the
# project's pins are not applied: on a lent machine its image's torch is what there is). jeat
# runs from src/ (PYTHONPATH), so no install is needed; wheels in .device/whl (torchattacks,
# for the attack comparison) are installed into a temporary folder first when present.
#
# Steps, each with its own time limit, each writing under DIR/<step>/ and a log DIR/<step>.log,
# so that one failing or hanging step does not cost the others:
#   env      torch, CUDA and the device as python3 sees them; nvidia-smi
#   tests    pytest tests/test_cuda.py (the CUDA sync detector in the attack and sampler loops,
#            on-device and pinned data, the fast path trains like fp32, CPU and device
#            evaluation agree, NCCL when two GPUs are there), in one process and without the
#            project's `-n auto` (the device's python may have no pytest-xdist)
#   fast     benchmarks/fast_path.py: PreAct-ResNet-18 PGD-AT (PGD-10), fp32 eager vs the fast
#            path (bf16, channels-last, compile): speed-up, PGD-20 gap, and each path's images/s,
#            achieved FLOP/s and MFU, with the number of epochs fitted to 8/9 of its time limit
#   memory   benchmarks/memory_estimate.py --measure: WRN-28-10 JEAT at batch 128, measured
#            peak CUDA memory against the estimate
#   mfu      benchmarks/train_throughput.py: the same PGD-AT on the fast path alone, images/s,
#            achieved FLOP/s and MFU (its compilation mostly cached by the fast step)
#   attack   benchmarks/attack_throughput.py: our PGD-20 vs torchattacks, and AMP and
#            channels-last rows (no compile rows: two cold compilations would not fit its
#            limit, and the fast step measures compile on the whole training step)
#   objectives  benchmarks/train_throughput.py as in mfu for standard, JEM and JEAT (their
#            images/s and MFU; the ratio to standard)
#   active   benchmarks/eval_cost.py --parts active,batch: the evaluation PGD's active set
#            (compaction every 5 steps on the device) against torchattacks on a digits PGD-AT
#            model trained on the device, with each variant's work; and the cost of an attack
#            step per row against batch size (would restarts side by side pay on a GPU?)
# Then DIR/summary.md (every step's exit status and table) and DIR/device_check.tar.gz (all of
# it). --pack leaves only those two files in DIR (for an output folder that brings back only
# a few files). The step limits are shares of --budget-s (default 540 s): env 3%, tests 17%,
# fast 32%, memory 7%, mfu 12%, attack 8%, objectives 13%, active 8%; with --only, the chosen
# steps share the whole budget (--only fast --budget-s 300 gives fast_path 300 s). The training
# steps use the first 4,992 CIFAR-10 subset images (39 batches of 128), so torch.compile never
# sees a smaller last batch (a recompilation); TORCH_LOGS=recompiles puts every recompilation in the
# logs. docs/performance.md ("Running the GPU checks") says how to prepare .device/ (the
# CIFAR-10 subset and the wheels) and run this on a lent GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

out=${OUT:-benchmarks/results/device_check}
data=.device/data
budget=540
only=env,tests,fast,memory,mfu,attack,objectives,active
pack=0
device=cuda
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --data-dir) data=$2; shift 2 ;;
        --budget-s) budget=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --pack) pack=1; shift ;;
        --device) device=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "device_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$budget" in ''|*[!0-9]*) echo "device_check.sh: --budget-s takes whole seconds" >&2; exit 2 ;; esac
[ -d "$data/cifar-10-batches-py" ] || echo "note: no $data/cifar-10-batches-py: the CIFAR-10 steps fall back to the digits"

mkdir -p "$out"
final=$out
[ $pack -eq 1 ] && out=$(mktemp -d)
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_LOGS=${TORCH_LOGS:-recompiles}
train_size=4992  # 39 batches of 128 of the 5,085-image subset: no smaller last batch
if compgen -G ".device/whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" .device/whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$site"
fi

start=$SECONDS
summary="$out/summary.md"
{
    echo "# device_check $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    if commit=$(git rev-parse --short HEAD 2>/dev/null); then
        git diff --quiet HEAD 2>/dev/null || commit="$commit with uncommitted changes"
    else
        commit="unknown (no git checkout here)"
    fi
    echo "commit $commit, budget ${budget} s, steps $only"
} >"$summary"

# step NAME SECONDS COMMAND...: run COMMAND with a time limit, log it, note its exit status
step() {
    local name=$1 limit=$2
    shift 2
    case ",$only," in *",$name,"*) ;; *) return 0 ;; esac
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    local note=""
    [ $rc -eq 124 ] && note=" (stopped at its ${limit}s limit)"
    echo "   rc=$rc$note, $((SECONDS - t0))s"
    {
        echo
        echo "## $name: exit $rc$note, $((SECONDS - t0)) s"
        echo
        echo '```'
        echo "$*"
        echo '```'
        if [ -f "$out/$name/table.md" ]; then
            echo
            cat "$out/$name/table.md"
        else
            # the log's last lines before a traceback (a step stopped at its limit ends in
            # one), then the traceback's last line
            echo
            echo '```'
            sed '/^Traceback (most recent call last)/,$d' "$out/$name.log" | tail -n 20
            grep -q '^Traceback' "$out/$name.log" && tail -n 1 "$out/$name.log"
            echo '```'
        fi
    } >>"$summary"
}

# each step's share of the budget; with --only, the chosen steps split the whole budget
declare -A shares=([env]=3 [tests]=17 [fast]=32 [memory]=7 [mfu]=12 [attack]=8 [objectives]=13
    [active]=8)
chosen=0
for name in "${!shares[@]}"; do
    case ",$only," in *",$name,"*) chosen=$((chosen + shares[$name])) ;; esac
done
[ $chosen -gt 0 ] || { echo "device_check.sh: --only names no step of: ${!shares[*]}" >&2; exit 2; }
share() { echo $(( budget * $1 / chosen )); }

step env "$(share "${shares[env]}")" bash -c "nvidia-smi || true; $py - <<'EOF'
import torch
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version())
print('available', torch.cuda.is_available(), 'devices', torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f'{p.total_memory / 2**30:.0f} GiB', 'capability', torch.cuda.get_device_capability(0),
          'bf16', torch.cuda.is_bf16_supported())
import jeat, sklearn, scipy, yaml, matplotlib, tqdm
print('jeat', jeat.__version__, 'from', jeat.__file__)
EOF"

step tests "$(share "${shares[tests]}")" "$py" -m pytest -q -o addopts=-ra -p no:cacheprovider --durations=15 tests/test_cuda.py

step fast "$(share "${shares[fast]}")" "$py" benchmarks/fast_path.py --device "$device" --data-dir "$data" \
    --train-size $train_size --budget-s "$(share $((shares[fast] * 8 / 9)))" --out "$out/fast"

step memory "$(share "${shares[memory]}")" "$py" benchmarks/memory_estimate.py --measure --device "$device" --out "$out/memory"

# train_throughput.py on the fast path (the objectives and --out follow)
throughput=("$py" benchmarks/train_throughput.py --device "$device" --data-dir "$data"
    --train-size $train_size --model preact_resnet18 --amp bf16 --channels-last true --compile
    --no-reference --epochs 3)

step mfu "$(share "${shares[mfu]}")" "${throughput[@]}" --objectives pgd-at --out "$out/mfu"

step attack "$(share "${shares[attack]}")" "$py" benchmarks/attack_throughput.py --device "$device" --repeats 3 \
    --variants a,b,c --out "$out/attack"

step objectives "$(share "${shares[objectives]}")" "${throughput[@]}" \
    --objectives standard,jem,jeat --out "$out/objectives"

step active "$(share "${shares[active]}")" "$py" benchmarks/eval_cost.py --parts active,batch \
    --device "$device" --work "$(mktemp -d)" --active-repeats 3 --active-repeats-restarts 1 \
    --repeats 3 --out "$out/active"

echo >>"$summary"
echo "total $((SECONDS - start)) s" >>"$summary"
tar -czf "$final/device_check.tar.gz.part" -C "$out" --exclude="device_check.tar.gz*" . \
    && mv "$final/device_check.tar.gz.part" "$final/device_check.tar.gz"
[ "$final" = "$out" ] || cp "$summary" "$final/summary.md"
cat "$summary"
