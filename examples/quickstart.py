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
"""DToP from nothing, in one command and a few CPU minutes, offline: on the built-in synthetic scenes, train a
small base model (no pruning), prune-finetune it (auxiliary exit thresholds on), sweep exit thresholds (mIoU and
GFLOPs per image), calibrate one threshold per auxiliary head (at most `--max_miou_drop` mIoU points lost, chosen
on calibration scenes the report never uses) and draw exit maps; print the table and where everything went.

    python examples/quickstart.py                          # default size: a few minutes on a laptop CPU
    python examples/quickstart.py --tiny                   # seconds (CI smoke test); or DTOP_QUICKSTART_TINY=1
    python examples/quickstart.py --base_steps 3000 --train_samples 3000   # longer, better

It chains the example scripts in one process: `finetune.py` twice (`--stage base`, then `--stage prune`) and
`evaluate.py` (threshold sweep and calibration), then draws a photo as `segment.py` does (with
`dtop_hf.toolkit.inference`). Written to `--output_dir`:

    base/         the base model          model/        the pruned model (exit threshold 0.9)
    calibrated/   the pruned model with its calibrated per-head thresholds: use this one
    evaluation/   table.md, results.json, gflops_vs_miou.png, pictures/ (validation scenes, one row per threshold)
    pictures/     segment.py's PNGs for a photo and a validation scene, at the model's threshold, the calibrated
                  ones and the lowest swept
    data/         the generated data set (reused by later runs)

The model folder loads in `pipeline("image-segmentation", model=..., trust_remote_code=True)` and in
`examples/segment.py --model <output_dir>/model`.
"""

import argparse
import importlib.util
import os
import time
from pathlib import Path

import torch
from PIL import Image

from dtop_hf.toolkit.evaluation.calibration import check_thresholds, choose_threshold, format_threshold, speedup
from dtop_hf.toolkit.inference.images import open_image
from dtop_hf.toolkit.inference.loading import load_model_and_processor
from dtop_hf.toolkit.inference.pictures import describe, write_outputs
from dtop_hf.toolkit.inference.segmentation import segment_image, stage_labels
from dtop_hf.toolkit.inference.visualization import default_stage_names, make_palette


EXAMPLES_DIR = Path(__file__).resolve().parent
TINY_ENVIRONMENT_VARIABLE = "DTOP_QUICKSTART_TINY"
# Run sizes. "default": the "quickstart" model size of dtop_hf.toolkit.presets.MODEL_SIZES (a 6-layer width-128 ViT, patch
# 8, ATM heads of width 64 after layers 3, 4 and 6; 1.9M parameters) on 96 px scenes, a 12x12 token grid: about
# 0.16 s per training step on two CPU cores. "tiny": the "tiny" size (a 4-layer width-32 ViT) on 32 px scenes, for CI.
RUN_SIZES = {
    "default": {
        "image_size": 96,
        "train_samples": 1000,
        "validation_samples": 100,
        "base_steps": 1000,
        "prune_steps": 200,
        "batch_size": 8,
        "learning_rate": 3e-4,
        "head_lr_multiplier": 3.0,
        "model_size": "quickstart",
        "thresholds": (1.0, 0.9, 0.8, 0.7, 0.6, 0.5),
    },
    "tiny": {
        "image_size": 32,
        "train_samples": 16,
        "validation_samples": 6,
        "base_steps": 3,
        "prune_steps": 2,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "head_lr_multiplier": 1.0,
        "model_size": "tiny",
        "thresholds": (1.0, 0.5),
    },
}


def tiny_from_environment() -> bool:
    return os.environ.get(TINY_ENVIRONMENT_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train, prune-finetune, evaluate and draw a small DToP on the built-in data set (offline)."
    )
    parser.add_argument("--output_dir", type=str, default="outputs/quickstart", help="Where models, tables and pictures go (default: %(default)s).")
    parser.add_argument("--tiny", action="store_true", default=tiny_from_environment(), help=f"Seconds-long smoke-test size (also with {TINY_ENVIRONMENT_VARIABLE}=1; default: off).")
    group = parser.add_argument_group("run size (defaults: the default size; with --tiny, the tiny one)")

    def sized(name: str, text: str) -> str:
        return f"{text} (default: {RUN_SIZES['default'][name]}; tiny: {RUN_SIZES['tiny'][name]})."

    group.add_argument("--image_size", type=int, default=None, help=sized("image_size", "Side of the generated scenes and of the model input"))
    group.add_argument("--train_samples", type=int, default=None, help=sized("train_samples", "Training scenes"))
    group.add_argument("--validation_samples", type=int, default=None, help=sized("validation_samples", "Validation scenes (evaluation and sweep)"))
    group.add_argument("--base_steps", type=int, default=None, help=sized("base_steps", "Optimiser steps of the base stage (no pruning)"))
    group.add_argument("--prune_steps", type=int, default=None, help=sized("prune_steps", "Optimiser steps of the pruning fine-tune"))
    group.add_argument("--batch_size", type=int, default=None, help=sized("batch_size", "Training batch size"))
    group.add_argument("--learning_rate", type=float, default=None, help=sized("learning_rate", "AdamW learning rate of the backbone"))
    group.add_argument("--head_lr_multiplier", type=float, default=None, help=sized("head_lr_multiplier", "The heads train at this multiple of the learning rate"))
    group.add_argument("--model_size", type=str, default=None, help=sized("model_size", "Model size of dtop_hf.toolkit.presets.MODEL_SIZES"))
    group.add_argument("--config_overrides", type=str, default=None, help="DToPConfig fields changed on the model size (see finetune.py; default: none).")
    group.add_argument("--thresholds", type=float, nargs="+", default=None, help=sized("thresholds", "Exit thresholds of the evaluation sweep; 1.0 = unpruned"))
    parser.add_argument("--exit_threshold", type=float, default=0.9, help="Exit threshold trained with in the pruning fine-tune and kept in the model (default: %(default)s, ViT-B's).")
    parser.add_argument("--max_miou_drop", type=float, default=0.3, help="Calibration budget: mIoU points the per-head thresholds may lose against the unpruned model (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=42, help="Seed of weights and data order (default: %(default)s).")
    parser.add_argument("--photo", type=str, default=None, help="Your own photo to segment at the end (default: scikit-image's astronaut when installed, and a validation scene).")
    args = parser.parse_args(argv)

    size = RUN_SIZES["tiny" if args.tiny else "default"]
    for name, value in size.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    for name in ("image_size", "train_samples", "validation_samples", "base_steps", "prune_steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    check_thresholds(args.thresholds)
    if not 0.0 < args.exit_threshold < 1.0:
        raise ValueError(f"`--exit_threshold` must lie in (0, 1) for the pruning fine-tune to prune, got {args.exit_threshold}.")
    if args.max_miou_drop < 0:
        raise ValueError(f"`--max_miou_drop` must be >= 0 (mIoU points), got {args.max_miou_drop}.")
    if args.photo is not None and not Path(args.photo).is_file():
        raise ValueError(f"`--photo` {args.photo!r} is not a file: pass the path of an image.")
    return args


def load_example(name: str):
    """`examples/<name>.py` as a module (under a name that cannot shadow the `evaluate` package)."""
    spec = importlib.util.spec_from_file_location(f"dtop_example_{name}", EXAMPLES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def data_arguments(args: argparse.Namespace, data_dir: Path) -> list[str]:
    """The built-in data set's flags shared by both training stages (same scenes, generated once, cached)."""
    return [
        "--synthetic_image_size", str(args.image_size),
        "--synthetic_train_samples", str(args.train_samples),
        "--synthetic_validation_samples", str(args.validation_samples),
        "--cache_dir", str(data_dir),
    ]  # fmt: skip


def training_arguments(args: argparse.Namespace, num_steps: int) -> list[str]:
    """Flags of one training stage: a short run from scratch, hence a higher learning rate than the official 2e-5
    (which fine-tunes an ImageNet backbone for 40k steps)."""
    arguments = [
        "--max_train_steps", str(num_steps),
        "--per_device_train_batch_size", str(args.batch_size),
        "--per_device_eval_batch_size", str(2 * args.batch_size),
        "--learning_rate", str(args.learning_rate),
        "--head_lr_multiplier", str(args.head_lr_multiplier),
        "--num_warmup_steps", str(max(1, num_steps // 20)),
        "--seed", str(args.seed),
    ]  # fmt: skip
    return arguments


def sample_images(args: argparse.Namespace) -> dict[str, Image.Image]:
    """Pictures to segment at the end: `--photo`, else scikit-image's astronaut (a real photo, when scikit-image is
    installed), and always one validation scene of the built-in data set."""
    from dtop_hf.toolkit.data.synthetic_scenes import make_synthetic_scenes

    images = {}
    if args.photo is not None:
        images[Path(args.photo).stem] = open_image(args.photo)
    else:
        try:
            from skimage import data as skimage_data

            images["astronaut"] = Image.fromarray(skimage_data.astronaut())
        except ImportError:
            print("scikit-image is not installed: no photo to segment (pass --photo, or pip install scikit-image)")
    scene = make_synthetic_scenes(1, image_size=args.image_size, seed=0, split="validation")[0]["image"]
    images["validation_scene"] = scene.convert("RGB")
    return images


def draw_pictures(
    model_dir: Path, images: dict[str, Image.Image], output_dir: Path, thresholds: list[float | tuple[float, ...]]
) -> list[str]:
    """Segment each image with the pruned model, once per exit threshold, and draw it as segment.py does; returns
    the summaries segment.py prints. Files are named `<image>_t<threshold>_<kind>.png` (`t0.6-0.9` for one
    threshold per auxiliary head)."""
    model, image_processor = load_model_and_processor(str(model_dir))
    config = model.config
    palette = make_palette(config.num_labels)
    stage_names = default_stage_names(len(config.out_indices), config.out_indices)
    labels = stage_labels(config.out_indices)
    id2label = {int(key): value for key, value in config.id2label.items()}
    summaries = []
    for name, image in images.items():
        for exit_threshold in thresholds:
            result = segment_image(model, image_processor, image, exit_threshold=exit_threshold)
            label = f"{name}_t{format_threshold(exit_threshold).replace(' / ', '-')}"
            write_outputs(image, result, palette, stage_names, output_dir, label)
            summaries.append(describe(label, image.size, result, labels, id2label))
    return summaries


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    base_dir, model_dir, calibrated_dir = output_dir / "base", output_dir / "model", output_dir / "calibrated"
    evaluation_dir, pictures_dir, data_dir = output_dir / "evaluation", output_dir / "pictures", output_dir / "data"
    finetune, evaluate = load_example("finetune"), load_example("evaluate")
    data = data_arguments(args, data_dir)
    size_name = "tiny" if args.tiny else "default"
    print(
        f"DToP quick start ({size_name} size): {args.train_samples} training / {args.validation_samples} validation "
        f"scenes of {args.image_size} px, {args.base_steps} base + {args.prune_steps} pruning steps, batch "
        f"{args.batch_size}, {torch.get_num_threads()} CPU threads -> {output_dir}",
        flush=True,
    )
    timings = {}

    start = time.perf_counter()
    print(f"\n[1/4] Base model (no pruning) -> {base_dir}", flush=True)
    base_overrides = ["--preset", args.model_size] + (["--config_overrides", args.config_overrides] if args.config_overrides else [])
    finetune.main(["--stage", "base", "--output_dir", str(base_dir)] + base_overrides + data + training_arguments(args, args.base_steps))
    timings["base training"] = time.perf_counter() - start

    start = time.perf_counter()
    print(f"\n[2/4] Pruning fine-tune (exit threshold {args.exit_threshold}) -> {model_dir}", flush=True)
    finetune.main(
        ["--stage", "prune", "--model_name_or_path", str(base_dir), "--exit_threshold", str(args.exit_threshold), "--output_dir", str(model_dir)]
        + data
        + training_arguments(args, args.prune_steps)
    )
    timings["pruning fine-tune"] = time.perf_counter() - start

    start = time.perf_counter()
    print(
        f"\n[3/4] Threshold sweep on the validation scenes, per-head thresholds calibrated on {args.validation_samples} "
        f"calibration scenes (at most {args.max_miou_drop:g} mIoU points lost) -> {evaluation_dir}, {calibrated_dir}",
        flush=True,
    )
    summary = evaluate.main(
        [
            "--model", str(model_dir), "--dataset_name", "builtin", "--output_dir", str(evaluation_dir),
            "--synthetic_image_size", str(args.image_size), "--synthetic_validation_samples", str(args.validation_samples),
            "--cache_dir", str(data_dir), "--per_device_eval_batch_size", str(2 * args.batch_size),
            "--num_pictures", "2", "--thresholds", *map(str, args.thresholds),
            "--max_miou_drop", str(args.max_miou_drop), "--calibration_samples", str(args.validation_samples),
            "--calibrated_output_dir", str(calibrated_dir),
        ]
    )  # fmt: skip
    calibration = summary["calibration"]
    calibrated = "error" not in calibration
    timings["evaluation and calibration"] = time.perf_counter() - start

    start = time.perf_counter()
    # At the model's own threshold, the calibrated ones, and the sweep's lowest: a model trained for minutes is rarely
    # sure enough of a real photo for its tokens to pass 0.9.
    picture_thresholds = [args.exit_threshold] + ([calibration["chosen"]["exit_threshold"]] if calibrated else [])
    picture_thresholds = list(dict.fromkeys(picture_thresholds + [min(args.thresholds)]))
    shown = ", ".join(map(format_threshold, picture_thresholds))
    print(f"\n[4/4] Exit maps (as examples/segment.py draws them) at thresholds {shown} -> {pictures_dir}", flush=True)
    summaries = draw_pictures(model_dir, sample_images(args), pictures_dir, picture_thresholds)
    print("\n".join(summaries))
    timings["pictures"] = time.perf_counter() - start

    table = (evaluation_dir / "table.md").read_text(encoding="utf-8").split("\n\nIoU per class")[0]
    print("\n" + "=" * 100)
    print(f"DToP quick start done in {sum(timings.values()):.0f} s (" + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()) + ")")
    print(
        f"\nThreshold sweep of {model_dir} on {summary['num_images']} validation scenes (GFLOPs per image), one "
        "threshold for every head, beside the thresholds calibrated for each head:\n"
    )
    print(table)
    print("\n" + compare_on_validation(summary, args.max_miou_drop) if calibrated else f"\n{calibration['error']}")
    use = calibrated_dir if calibrated else model_dir
    print(
        f"\nWritten:\n"
        + (f"  {calibrated_dir}   the pruned model with its calibrated thresholds: use this one\n" if calibrated else "")
        + f"  {model_dir}   the pruned model (exit threshold {args.exit_threshold}); base model in {base_dir}\n"
        f"  {evaluation_dir}   table.md, results.json, gflops_vs_miou.png, pictures/\n"
        f"  {pictures_dir}   <image>_t<threshold>_segmentation.png, _exit_map.png, _overlay.png\n"
        f"\nNext: python examples/segment.py your_photo.jpg --model {use}\n"
        f"      python examples/evaluate.py --model {model_dir} --synthetic_image_size {args.image_size} --max_miou_drop 0.5 "
        f"--output_dir {output_dir / 'calibration'}"
    )
    return {
        "summary": summary,
        "timings": timings,
        "model_dir": model_dir,
        "calibrated_dir": calibrated_dir if calibrated else None,
        "pictures_dir": pictures_dir,
    }


def compare_on_validation(summary: dict, max_miou_drop: float) -> str:
    """R at the mIoU budget on the validation scenes: the calibrated thresholds (chosen on other scenes) against
    the best single threshold of the sweep (chosen, with hindsight, on the validation scenes themselves)."""
    calibrated = summary["calibration"]["on_evaluation_split"]
    baseline = calibrated["baseline"]
    single = choose_threshold(summary["results"] + [baseline], max_miou_drop=max_miou_drop / 100)

    def describe_point(result: dict) -> str:
        change = 100 * (result["mean_iou"] - baseline["mean_iou"])
        return f"{format_threshold(result['exit_threshold'])}: R = {speedup(result, baseline):.2f} at {change:+.2f} mIoU"

    return (
        f"On the validation scenes, within {max_miou_drop:g} mIoU points: calibrated thresholds "
        f"{describe_point(calibrated['chosen'])}; best single threshold of the sweep {describe_point(single)}."
    )


if __name__ == "__main__":
    main()
