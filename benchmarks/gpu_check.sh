#!/usr/bin/env bash
# Issue 16: the whole Lightning path on CUDA plus the engine's GPU benchmarks. On an H200 (2026-12-04)
# it took two device calls back to back, 353 s and 409 s of a 900 s lease (the machine's start ~35 s):
#
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh prepare   # once, here: .gpu/whl, .gpu/extra
#   run(carry=[".gpu/whl", ".gpu/extra"], command='OUT=$OUT CHECK_STEPS="3 1 2" bash benchmarks/gpu_check.sh', timeout_s=400)
#   run(carry=[".gpu/whl", ".gpu/extra"], command='OUT=$OUT CHECK_STEPS="6 5" bash benchmarks/gpu_check.sh', timeout_s=420)
#
# transformers 5.18 travels as a wheel (.gpu/extra: the training script's calls have no room for it):
# the card's image has 5.17, CI tests 5.18. The default order is
# "3 1 2 6 5": the 8B-shape engine benchmarks first, alone on the GPU, then the tiny-model checks of
# steps 1-2, whose processes run side by side (their tok/s are not measurements), then the profiles
# and inductor. Each benchmark runs under `timeout`, so one that hangs leaves time for the rest.
#
# 1. predict on a tiny fp32 model with backend cuda_graph under 32-true, bf16-mixed and bf16-true, and
#    inductor under 32-true: responses against the eager engine in the same precision, the summary
#    line's tok/s, inductor's compiles; then (1b) cuda_graph with the prompt
#    cache on prompts that share a beginning, against eager without it;
# 2. a few `dllm_lit fit` steps of the tiny model under --trainer.strategy fsdp (one process) and
#    ddp: loss going down, a checkpoint saved and exported;
# 3. on the 8B shape: bench_gpu.py (graphs on the issue's workloads 0 5 6; lossless and HF generate at
#    512+256, workloads 7 8);
# 6. why: bench_forward_profile.py (one forward's kernels by kind, each fusion left out beside it; batch 1
#    and batch 8) and bench_hf_generate.py (W = 1 against HF generate, with and without a static cache);
# 5. inductor at workload 0 and at W = 1, workload 8 (bench_gpu.py --modes inductor).
# 4. (issue 13) the SmolLM2-shape LoRA training step (the draft adapter's layout, rows of 300 tokens with
#    a 40-token prompt: the longest batch of the distilled rows) at batch 64, 128 and 256: ms, operators
#    and peak GiB. Pick the largest batch whose step costs well
#    under its share (the step was bound by operators dispatched at 64) and fits: BATCH=... below.
# CHECK_ACCEL=cpu runs steps 1-2 on the CPU (bf16 steps skipped) to check the script itself;
# CHECK_STEPS picks the steps and their order (default "3 1 2 6 5").
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ "${1:-}" = prepare ]; then  # here: the wheels the card's image lacks, and the transformers CI tests
  PYTHON="$PY" bash benchmarks/train_smollm2_gpu.sh wheels || exit
  exec "$PY" -m pip download -q --no-deps --only-binary=:all: -d .gpu/extra "transformers==5.18.0"
fi
ACCEL="${CHECK_ACCEL:-gpu}"
OUT="${OUT:-outputs/gpu_check}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.gpu/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DLLM_LIT_CACHE="$WORK/cache"
if [ -d .gpu/whl ] && [ ! -d .gpu/site/jsonargparse ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target .gpu/site .gpu/whl/*.whl $(ls .gpu/extra/*.whl 2>/dev/null)
fi
log() { echo "== $*" | tee -a "$OUT/summary.md"; }

"$PY" -c "from dllm_lit.tiny import save_tiny_model; save_tiny_model('$WORK/tiny', initializer_range=0.3)"
printf 'What is 2+2?\nName a color.\nx\nCount to ten, slowly and carefully.\n' > "$WORK/prompts.txt"
sed 's/^/You are a patient teacher; answer briefly and carefully. /' "$WORK/prompts.txt" > "$WORK/shared.txt"
if [ "$ACCEL" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.md"
fi
"$PY" -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/summary.md"

predict() {  # predict OUTPUT EXTRA...: in the background; OUTPUT.rc holds its exit status
  local out="$1"; shift
  ( "$PY" -m dllm_lit.cli predict --model.model_name_or_path "$WORK/tiny" --data.prompts_file "$WORK/prompts.txt" \
      --model.add_eos_length 7 --model.max_new_tokens 64 --writer.output_file "$out" "$@" 2>"$out.err" >/dev/null
    echo $? >"$out.rc" ) &
}
compare() {  # compare REFERENCE OUTPUT LABEL: responses equal, the summary line, cached prompt tokens
  local ref="$1" out="$2" label="$3"
  if [ "$(cat "$ref.rc")" != 0 ] || [ "$(cat "$out.rc")" != 0 ]; then
    log "$label FAILED: $(tail -1 "$ref.err") / $(tail -1 "$out.err")"
    tail -n 15 "$ref.err" "$out.err" >>"$OUT/errors.log"
    return
  fi
  grep -h "tok/s\|inductor: compiled" "$out.err" | tee -a "$OUT/summary.md"
  "$PY" - "$ref" "$out" "$label" <<'PYEOF' | tee -a "$OUT/summary.md"
import json, sys
def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]
a, b = read(sys.argv[1]), read(sys.argv[2])
same = sum(x["response"] == y["response"] for x, y in zip(a, b))
cached = [row.get("cached_tokens", 0) for row in b]
print(f"{sys.argv[3]}: {same}/{len(a)} responses equal to the reference, cached prompt tokens {cached}")
PYEOF
}

step1() {  # predict on the accelerator: compiled against eager in each precision, the prompt cache
log "1. predict on $ACCEL: the compiled backend against the eager engine in the same precision; 1b. the prompt cache"
runs="cuda_graph:32-true inductor:32-true"  # inductor's dynamic shapes have never run on a card: fp32 only
[ "$ACCEL" = gpu ] && runs="cuda_graph:32-true cuda_graph:bf16-mixed cuda_graph:bf16-true inductor:32-true"
precisions=$(for run in $runs; do echo "${run#*:}"; done | sort -u)
for mode in block lossless; do
  lossless=$([ $mode = lossless ] && echo true || echo false)
  for precision in $precisions; do  # the references: the eager engine in each precision, with the
    # compiled path's full window (the adaptive one's one-token passes round bf16 logits differently)
    predict "$WORK/eager-$precision-$mode.jsonl" --trainer.accelerator "$ACCEL" --trainer.precision "$precision" \
      --model.lossless "$lossless" --model.adaptive_window false
  done
  for run in $runs; do
    predict "$WORK/${run/:/-}-$mode.jsonl" --trainer.accelerator "$ACCEL" --trainer.precision "${run#*:}" \
      --model.backend "${run%%:*}" --model.lossless "$lossless"
  done
  # 1b: prompts that share a beginning, one by one, cuda_graph with the prompt cache against eager without it
  shared=(--trainer.accelerator "$ACCEL" --model.lossless "$lossless" --model.adaptive_window false --data.prompts_file "$WORK/shared.txt" --data.batch_size 1)
  predict "$WORK/shared-eager-$mode.jsonl" "${shared[@]}"
  predict "$WORK/shared-cached-$mode.jsonl" "${shared[@]}" --model.backend cuda_graph --model.prompt_cache_mib 64
done
wait
for mode in block lossless; do
  for run in $runs; do
    compare "$WORK/eager-${run#*:}-$mode.jsonl" "$WORK/${run/:/-}-$mode.jsonl" "${run/:/ } $mode"
  done
  compare "$WORK/shared-eager-$mode.jsonl" "$WORK/shared-cached-$mode.jsonl" "cuda_graph prompt cache $mode"
done
}

step2() {  # a few fit steps of the tiny model under fsdp and ddp, side by side
log "2. fit on $ACCEL under fsdp and ddp (tiny model, 30 steps)"
"$PY" -m dllm_lit.tasks addition --out "$WORK/add" --train 512 --val 8 >/dev/null
port=29611
for strategy in fsdp ddp; do
  run="$WORK/fit-$strategy" port=$((port + 1))
  ( MASTER_PORT=$port "$PY" -m dllm_lit.cli fit --config configs/train_tiny.yaml --model.model_name_or_path "$WORK/tiny" \
      --data.train_file "$WORK/add/train.jsonl" --data.val_file "$WORK/add/val.jsonl" --data.batch_size 32 \
      --trainer.accelerator "$ACCEL" --trainer.devices 1 --trainer.strategy "$strategy" --trainer.max_steps 30 \
      --trainer.val_check_interval 15 --trainer.log_every_n_steps 5 --trainer.logger.init_args.save_dir "$run/logs" \
      --trainer.callbacks.init_args.output_dir "$run/export" >"$run.log" 2>&1
    echo $? >"$run.rc" ) &
done
wait
for strategy in fsdp ddp; do
  run="$WORK/fit-$strategy"
  if [ "$(cat "$run.rc")" = 0 ]; then
    "$PY" - "$run" <<'PYEOF' | tee -a "$OUT/summary.md"
import csv, pathlib, sys
run = pathlib.Path(sys.argv[1])
rows = list(csv.DictReader(next(run.rglob("metrics.csv")).open()))
losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
ckpts = list(run.rglob("*.ckpt"))
print(f"{run.name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, checkpoints {len(ckpts)}, "
      f"exported {(run / 'export' / 'config.json').is_file()}")
PYEOF
  else
    log "fit $strategy FAILED: $(tail -3 "$run.log")"
    tail -n 30 "$run.log" >>"$OUT/errors.log"
  fi
done
}

bench() {  # bench SECONDS NAME SCRIPT ARGS...: one benchmark under a time limit, its table to $OUT/NAME.md
  local limit="$1" name="$2"; shift 2
  timeout "$limit" "$PY" "$@" 2>>"$OUT/errors.log" | tee -a "$OUT/$name.md"
  local rc="${PIPESTATUS[0]}"
  [ "$rc" = 0 ] || log "$name: $* stopped with status $rc (124: its $limit s ran out)"
}

step3() {  # the 8B-shape engine benchmarks (the issue's targets), on a GPU only
  [ "$ACCEL" = gpu ] || return 0
  log "3. 8B shape: bench_gpu.py (graphs on workloads 0 5 6; lossless and HF generate at 512+256, 7 8)"
  bench 150 bench_gpu benchmarks/bench_gpu.py --modes compiled --workloads 0 5 6 --repeats 3
  bench 150 bench_gpu benchmarks/bench_gpu.py --modes compiled lossless hf --workloads 7 8 --repeats 2
}

step6() {  # why: one forward's kernels (batch 1 and 8), W = 1 against HF generate in one process
  [ "$ACCEL" = gpu ] || return 0
  log "6. 8B shape: bench_forward_profile.py (batch 1, batch 8), bench_hf_generate.py"
  bench 120 bench_profile benchmarks/bench_forward_profile.py --widths 1 127 255
  bench 75 bench_profile benchmarks/bench_forward_profile.py --batch 8 --widths 127 255
  bench 180 bench_hf benchmarks/bench_hf_generate.py --new-tokens 64 --repeats 2
}

step4() {  # issue 13's training step at the real size: ms, operators and peak memory per layout
  [ "$ACCEL" = gpu ] || return 0
  log "4. SmolLM2-shape LoRA training step (bench_train_step.py), bf16 autocast"
  bench 300 bench_train_step benchmarks/bench_train_step.py --shape smollm2 --device cuda --dtype bfloat16 \
    --length 300 --prompt 40 --repeats 3 --layouts draft --batch-sizes 64 128 256
}

step5() {  # inductor at workload 0 and at W = 1 (workload 8), on a GPU only; last: it may run out of time
  [ "$ACCEL" = gpu ] || return 0
  log "5. inductor at workloads 0 and 8"
  bench 150 bench_gpu benchmarks/bench_gpu.py --modes inductor --workloads 0 --repeats 3
  bench 120 bench_gpu benchmarks/bench_gpu.py --modes inductor --workloads 8 --repeats 2
}

for step in ${CHECK_STEPS:-3 1 2 6 5}; do "step$step"; done
cat "$OUT/summary.md"
