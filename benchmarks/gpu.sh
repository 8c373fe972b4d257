#!/usr/bin/env bash
# The GPU rows of docs/memory.md in one pass (estimated at about 8 minutes on one 80 GB card; not yet run):
# full-size random-weight SDXL and SD 1.5 pipelines, then CUDA max allocated and step time of each configuration,
# ours and, with REFERENCE_DIR set, diffusers' example scripts beside them.
#
#   bash benchmarks/gpu.sh                                   # results in results/gpu/memory.jsonl + memory.md
#   REFERENCE_DIR=path/to/diffusers/examples/consistency_distillation bash benchmarks/gpu.sh
#   OUT=elsewhere MODELS=folder/with/models bash benchmarks/gpu.sh
#
# Each run has its own time limit (ROW_TIMEOUT seconds, default 150): a row that runs out is reported and skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-results/gpu}
MODELS=${MODELS:-$OUT/models}
ROW_TIMEOUT=${ROW_TIMEOUT:-150}
mkdir -p "$OUT" "$MODELS"
JSONL="$OUT/memory.jsonl"
python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || { echo "error: no CUDA GPU visible"; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"

# models (random weights, fp16 on disk) and the toy world's images and captions as data
for model in sdxl sd15; do
    [ -f "$MODELS/$model/model_index.json" ] || python benchmarks/full_size.py --model "$model" --output_dir "$MODELS/$model"
done
python -m utils.toy build >/dev/null
DATA="--train_data_dir toy_world/data/train --max_train_samples 16"
SHARDS="--train_shards_path_or_url toy_world/data/shards/shard-{000000..000003}.tar --max_train_samples 16"
COMMON="--train_batch_size 1 --mixed_precision bf16 --gradient_checkpointing --report_to tensorboard"
SDXL="--pretrained_teacher_model $MODELS/sdxl $COMMON"
SD15="--pretrained_teacher_model $MODELS/sd15 $COMMON"

row() {  # row LABEL RECIPE REFERENCE_SCRIPT_OR_- BENCH_FLAGS -- RECIPE_FLAGS
    local label=$1 recipe=$2 reference=$3
    shift 3
    local ref=()
    if [ "$reference" != "-" ] && [ -n "${REFERENCE_DIR:-}" ] && [ -f "$REFERENCE_DIR/$reference" ]; then
        ref=(--reference "$REFERENCE_DIR/$reference")
    fi
    echo "== $label" >&2
    timeout "$ROW_TIMEOUT" python benchmarks/bench_memory.py --recipe "$recipe" "${ref[@]}" --label "$label" \
        --append "$JSONL" "$@" || echo "row '$label' did not finish (exit $?)" >&2
}

LORA=train_lcm_distill_lora_sdxl.py
CACHES="--cache_text_embeddings --cache_latents"
row "lora sdxl 1024 gc r64" $LORA train_lcm_distill_lora_sdxl.py --steps 4 --until train -- $SDXL $DATA --resolution 1024 --lora_rank 64 --lora_alpha 64
row "lora sdxl 1024 gc r64 +caches +8bit" $LORA - --steps 4 --until train -- $SDXL $DATA --resolution 1024 --lora_rank 64 $CACHES --use_8bit_adam
row "lora sdxl 1024 gc r16 +caches +8bit" $LORA - --steps 4 --until train -- $SDXL $DATA --resolution 1024 --lora_rank 16 $CACHES --use_8bit_adam
row "lora sdxl 512 gc r64" $LORA train_lcm_distill_lora_sdxl.py --steps 4 --until train -- $SDXL $DATA --resolution 512 --lora_rank 64 --lora_alpha 64
row "tlcm sdxl stage1 1024 gc r64 +cache +8bit" train_tlcm_sdxl.py - --steps 4 --until train --steps_flag=--stage1_steps -- \
    $SDXL --prompts_file toy_world/data/train/metadata.jsonl --max_train_samples 16 --stage 1 --resolution 1024 --lora_rank 64 --cache_text_embeddings --use_8bit_adam
row "lcm sd15 512 gc +8bit +cast" train_lcm_distill_sd.py train_lcm_distill_sd_wds.py --steps 4 --until train \
    --theirs="--dataloader_num_workers 1" -- $SD15 $SHARDS --resolution 512 --use_8bit_adam --cast_teacher_unet
row "lcm sdxl 1024 gc +8bit +cast +ema on cpu" train_lcm_distill_sd.py - --steps 3 --until train --ours="--ema_target_on_cpu" -- \
    $SDXL $DATA --resolution 1024 --use_8bit_adam --cast_teacher_unet

python benchmarks/memory_estimate.py --measured "$JSONL" > "$OUT/memory.md"
echo "results: $JSONL, $OUT/memory.md" >&2
