#!/usr/bin/env bash
# Copyright 2026 The dtop-hf Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# Run the multi-process example scripts many times and count the runs that did not exit 0. Not part of CI: a
# shutdown race shows up once in tens of runs, so only repetition finds it.
#
#   scripts/stress_clean_exit.sh [RUNS_PER_SCRIPT] [REPO] [SCRIPTS...]
#   nice -n 19 scripts/stress_clean_exit.sh 20                       # segment, evaluation, finetune; 20 runs each
#   nice -n 19 scripts/stress_clean_exit.sh 20 /tmp/older_tree segment  # another checkout, one script
#
# Every run is `accelerate launch --multi_gpu --num_processes 2 ... --cpu` with ACCELERATE_USE_CPU (two gloo ranks
# on CPU), tiny models and data. The flags are the earlier releases' (`--model`, `--threshold`, `--cpu`, ...), which
# today's scripts still accept: one command line for older checkouts and this one. The logs (and core dumps, where
# the system writes them to the crashed process's folder) of failed runs stay in the printed work folder; the last
# line per script is "<script>: F of N failed".
#
# ONE_BUSY_CORE=1 runs every launch on CPU 0 next to a busy loop: a thread that the ranks start (Gloo's workers)
# then waits for the CPU as on a loaded machine, which is when shutdown races show (an idle machine hides them).
set -uo pipefail

RUNS=${1:-20}
REPO=$(cd "${2:-$(dirname "$0")/..}" && pwd)
JOBS=("${@:3}")
(( ${#JOBS[@]} )) || JOBS=(segment evaluation finetune)
WORK=$(mktemp -d /tmp/stress_clean_exit.XXXXXX)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
export TQDM_DISABLE=1 HF_DATASETS_CACHE="$WORK/hf_datasets"
ulimit -c unlimited 2>/dev/null || true  # a core of the aborting rank, when the system allows one
echo "repository $REPO, work folder $WORK, $RUNS runs of: ${JOBS[*]}"

# A tiny saved model (8x8 token grid, 3 heads, the built-in data set's classes) and five small images.
python - "$WORK" <<'PYTHON' || exit 2
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dtop_hf import DToPConfig, DToPForSemanticSegmentation, DToPImageProcessor
from dtop_hf.toolkit.data.synthetic_scenes import SYNTHETIC_ID2LABEL

work = Path(sys.argv[1])
id2label = dict(SYNTHETIC_ID2LABEL)
config = DToPConfig(
    image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
    out_indices=[1, 2, 3], head_hidden_size=16, head_num_attention_heads=2, head_num_layers=1, exit_threshold=0.6,
    id2label=id2label, label2id={name: index for index, name in id2label.items()}, initializer_range=0.5,
)  # fmt: skip
DToPForSemanticSegmentation(config).save_pretrained(work / "model")
DToPImageProcessor(size={"height": 32, "width": 32}, do_reduce_labels=True).save_pretrained(work / "model")
(work / "images").mkdir()
rng = np.random.default_rng(0)
for index, (height, width) in enumerate([(40, 56), (40, 56), (64, 48), (33, 33), (50, 70)]):
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(work / "images" / f"{index}.png")
PYTHON

EVALUATION_SCRIPT="$REPO/examples/run_evaluation.py"
[[ -f $EVALUATION_SCRIPT ]] || EVALUATION_SCRIPT="$REPO/examples/evaluate.py"
TINY_MODEL="hidden_size=32,num_hidden_layers=4,num_attention_heads=2,intermediate_size=64,patch_size=4,"
TINY_MODEL+="head_hidden_size=16,head_num_attention_heads=2,head_num_layers=1,out_indices=[1,2,3]"

# The script and its arguments for one run of a job; $1 = the run's own output folder.
job_command() {
    case $JOB in
        segment) echo "$REPO/examples/segment.py $WORK/images --model $WORK/model --threshold 0.6 --batch_size 2" \
                      "--output_dir $1 --overwrite" ;;
        evaluation) echo "$EVALUATION_SCRIPT --model $WORK/model --dataset_name builtin --synthetic_image_size 32" \
                         "--max_eval_samples 4 --per_device_eval_batch_size 2 --thresholds 1.0 0.6 --num_pictures 1" \
                         "--output_dir $1" ;;
        finetune) echo "$REPO/examples/finetune.py --config_overrides $TINY_MODEL --synthetic_image_size 32" \
                       "--synthetic_train_samples 8 --synthetic_validation_samples 2 --per_device_train_batch_size 2" \
                       "--per_device_eval_batch_size 1 --max_train_steps 2 --output_dir $1" ;;
        *) echo "unknown script $JOB (segment, evaluation, finetune)" >&2; exit 2 ;;
    esac
}

PIN=()
if [[ ${ONE_BUSY_CORE:-0} == 1 ]]; then
    taskset -c 0 bash -c 'while :; do :; done' &
    BUSY_LOOP=$!
    trap 'kill "$BUSY_LOOP"' EXIT
    PIN=(taskset -c 0)
fi

free_port() {
    python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

for JOB in "${JOBS[@]}"; do
    failed=0
    for run in $(seq 1 "$RUNS"); do
        folder="$WORK/$JOB/$run"
        mkdir -p "$folder"
        # shellcheck disable=SC2046  # the command's words are split on purpose
        (cd "$folder" && "${PIN[@]}" python -m accelerate.commands.launch --multi_gpu --num_processes 2 \
            --num_machines 1 --mixed_precision no --dynamo_backend no --main_process_port "$(free_port)" \
            $(job_command "$folder/out") --cpu >"$folder/log.txt" 2>&1)
        status=$?
        if (( status != 0 )); then
            failed=$((failed + 1))
            aborts=$(grep -c "terminate called" "$folder/log.txt")
            echo "$JOB run $run: exit $status ($aborts x 'terminate called'), log $folder/log.txt"
        else
            rm -rf "$folder"  # keep only what explains a failure
        fi
    done
    echo "$JOB: $failed of $RUNS failed"
done
