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
"""Segment your own images with a DToP model and draw where each token left the network.

For every image, writes to `--output_dir`:
- `<name>_classes.png`: the class ids (a palette PNG: pixel value = class id, shown in colour), at the image's size;
- `<name>_segmentation.png`: the colour-coded class map, at the image's size;
- `<name>_overlay.png`: the class map blended on the image, at the image's size;
- `<name>_exit_map.png`: the image beside its exit map (which head finalised each token: green = first auxiliary
  head, red = decode head), with a legend of the token counts;
(`--no_pictures`: the class maps only) and prints, per image, the tokens that exited at each head, the classes found
and the GFLOPs spent (MACs / 1e9, SPEC §5), then a summary.

    python examples/segment.py photo.jpg more.png some_folder/ --model outputs/quickstart/model
    python examples/segment.py photo.jpg --model <folder|hub id> --threshold 0.8 --output_dir pictures
    python examples/segment.py big_photo.jpg --model <folder|hub id> --sliding_window   # official test mode

A large folder, on every GPU, resumable (images whose outputs exist are skipped; `--overwrite` redoes them):

    accelerate launch examples/segment.py folder/ --model <folder|hub id> --batch_size 8 --no_pictures

Images of any size and mode (grey, RGBA, palette, 16-bit) are accepted and EXIF rotation is applied; a file that is
not a readable image is reported and skipped. The exit code is non-zero only when no image could be segmented.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

import dtop_hf  # noqa: F401  (registers DToP with the Auto classes)
from arguments import add_cpu_argument, require_positive
from dtop_hf.toolkit.evaluation.calibration import check_thresholds
from dtop_hf.toolkit.inference.images import find_images, open_image, unique_names, upright_size
from dtop_hf.toolkit.inference.loading import load_model_and_processor
from dtop_hf.toolkit.inference.pictures import describe, exits_summary, output_paths, write_outputs
from dtop_hf.toolkit.inference.segmentation import segment_images, sliding_window_processor, stage_labels
from dtop_hf.toolkit.inference.visualization import default_stage_names, make_palette


# What Pillow raises for a file that is not a readable image.
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def unreadable_message(path: Path, error: Exception) -> str:
    return f"{path}: not a readable image ({type(error).__name__}: {error})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Segment images with a DToP model; write class-map, segmentation, exit-map and overlay PNGs."
    )
    parser.add_argument("inputs", type=str, nargs="+", help="Image files and/or folders of images.")
    parser.add_argument("--model", type=str, required=True, help="DToP model folder (with config.json and preprocessor_config.json) or Hub id.")
    parser.add_argument("--threshold", type=float, default=None, help="Exit threshold of the auxiliary heads in (0, 1]; 1.0 = unpruned; default: the model's own.")
    parser.add_argument("--output_dir", type=str, default="outputs/segment", help="Where the PNGs are written (default: %(default)s).")
    parser.add_argument("--sliding_window", action="store_true", help="Official test mode: aspect ratio kept (shorter side at the processor's crop size), overlapping windows (for large images; default: off, the whole image resized to the processor's size, unless the processor was saved in slide mode).")
    parser.add_argument("--batch_size", type=int, default=1, help="Images of the same size per forward pass (default: %(default)s).")
    parser.add_argument("--no_pictures", action="store_true", help="Write only the class maps (<name>_classes.png), not the colour pictures (faster).")
    parser.add_argument("--overwrite", action="store_true", help="Segment images whose outputs already exist (default: skip them, so that an interrupted run resumes).")
    parser.add_argument("--alpha", type=float, default=0.5, help="Opacity of the class and exit colours in the overlay pictures (default: %(default)s).")
    parser.add_argument("--figure_max_side", type=int, default=512, help="Longest side of each panel of the exit-map picture (default: %(default)s; large photos are shown smaller).")
    add_cpu_argument(parser)
    args = parser.parse_args(argv)
    if args.threshold is not None:
        check_thresholds([args.threshold])
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"`--alpha` must lie in [0, 1], got {args.alpha}.")
    if args.figure_max_side < 16:
        raise ValueError(f"`--figure_max_side` must be >= 16 pixels, got {args.figure_max_side}.")
    require_positive(args, ["batch_size"])
    return args


def plan_batches(
    paths: list[Path], names: list[str], args: argparse.Namespace
) -> tuple[list[list[tuple[int, Path, str]]], int, list[str]]:
    """The images still to segment, in batches of up to `--batch_size` images of the same upright size (in order
    of first appearance), the number already done (all outputs present) and a message per unreadable file. The same
    inputs give the same plan in every process."""
    output_dir, pictures = Path(args.output_dir), not args.no_pictures
    open_batches: dict[tuple[int, int], list[tuple[int, Path, str]]] = {}
    batches, num_done, problems = [], 0, []
    for index, (path, name) in enumerate(zip(paths, names, strict=True)):
        if not args.overwrite and all(file.is_file() for file in output_paths(output_dir, name, pictures).values()):
            num_done += 1
            continue
        try:
            size = upright_size(path)
        except UNREADABLE as error:
            problems.append(unreadable_message(path, error))
            continue
        batch = open_batches.setdefault(size, [])
        if not batch:
            batches.append(batch)  # placed where its first image comes
        batch.append((index, path, name))
        if len(batch) == args.batch_size:
            del open_batches[size]
    return batches, num_done, problems


def segment_batch(model, image_processor, batch, args, palette, stage_names, labels, id2label) -> list[dict]:
    """Segment and write one batch; one record per image (`index`, then `description` and counts, or `problem`)."""
    records, images, kept = [], [], []
    for index, path, name in batch:
        try:
            images.append(open_image(path))
            kept.append((index, path, name))
        except UNREADABLE as error:  # the header read, the pixels did not (a truncated file)
            records.append({"index": index, "problem": unreadable_message(path, error)})
    results = segment_images(model, image_processor, images, args.threshold, args.sliding_window) if images else []
    for (index, path, name), image, result in zip(kept, images, results, strict=True):
        write_outputs(
            image, result, palette, stage_names, Path(args.output_dir), name,
            pictures=not args.no_pictures, alpha=args.alpha, figure_max_side=args.figure_max_side,
        )  # fmt: skip
        records.append(
            {
                "index": index,
                "description": describe(str(path), image.size, result, labels, id2label),
                "exits": result.exits,
                "gflops": result.gflops,
                "gflops_all_heads": result.gflops_all_heads,
                "gflops_unpruned": result.gflops_unpruned,
            }
        )
    return records


def summary(
    records: list[dict], num_done: int, num_skipped: int, seconds: float, labels: list[str], output_dir: str
) -> str:
    """The run's last lines: images, tokens exited per head, GFLOPs per image, images per second."""
    segmented = [record for record in records if "description" in record]
    lines = [
        f"Segmented {len(segmented)} image(s), skipped {num_skipped}, {num_done} already done (--overwrite redoes "
        f"them); outputs in {output_dir}"
    ]
    if segmented:
        exits = [sum(record["exits"][stage] for record in segmented) for stage in range(len(labels))]
        count = len(segmented)
        mean = {
            key: sum(record[key] for record in segmented) / count
            for key in ("gflops", "gflops_all_heads", "gflops_unpruned")
        }
        saved = 100 * (1 - mean["gflops"] / mean["gflops_unpruned"]) if mean["gflops_unpruned"] else 0.0
        lines += [
            f"  tokens exited at {exits_summary(exits, labels)}",
            f"  GFLOPs per image {mean['gflops']:.4g} (backbone + decode head; all heads "
            f"{mean['gflops_all_heads']:.4g}; unpruned {mean['gflops_unpruned']:.4g}, {saved:.1f}% saved)",
            f"  {count / max(seconds, 1e-9):.2f} images/s ({seconds:.1f} s)",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Segment every image (split across the processes of `accelerate launch`); returns the exit code (1 when no
    image could be segmented and none was already done)."""
    args = parse_args(argv)
    state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
    try:
        model, image_processor = load_model_and_processor(args.model, state.device, argument="--model")
    except ValueError as error:
        if state.is_main_process:
            print(f"error: {error}", file=sys.stderr)
        return 2
    if args.sliding_window:
        image_processor = sliding_window_processor(image_processor)
    config = model.config
    threshold = args.threshold if args.threshold is not None else config.exit_thresholds_per_head()[:-1]
    palette = make_palette(config.num_labels)
    stage_names = default_stage_names(len(config.out_indices), config.out_indices)
    labels = stage_labels(config.out_indices)
    id2label = {int(key): value for key, value in config.id2label.items()}

    paths, problems = find_images(args.inputs)
    batches, num_done, unreadable = plan_batches(paths, unique_names(paths), args)
    state.wait_for_everyone()  # every process plans before any writes, so that all agree on what is left to do
    if state.is_main_process:
        print(
            f"{args.model}: {config.num_labels} classes, heads after layers {list(config.out_indices)}, exit "
            f"threshold {threshold}; {sum(map(len, batches))} image(s) to segment on {state.num_processes} process(es)"
        )
    start = time.perf_counter()
    records = []
    with state.split_between_processes(batches) as own_batches:
        progress = tqdm(own_batches, desc="segmenting", unit="batch", disable=not state.is_main_process)
        for batch in progress:
            records += segment_batch(model, image_processor, batch, args, palette, stage_names, labels, id2label)
    records = sorted(gather_object(records), key=lambda record: record["index"])
    seconds = time.perf_counter() - start
    if not state.is_main_process:
        return 0
    for record in records:
        if "description" in record:
            print(record["description"])
    for problem in problems + unreadable + [record["problem"] for record in records if "problem" in record]:
        print(f"skipped {problem}", file=sys.stderr)
    num_skipped = len(problems) + len(unreadable) + sum("problem" in record for record in records)
    print(summary(records, num_done, num_skipped, seconds, labels, args.output_dir))
    if num_done == 0 and not any("description" in record for record in records):
        print("error: no image could be segmented (see the messages above).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
