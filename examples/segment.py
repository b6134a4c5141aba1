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
- `<name>_segmentation.png`: the colour-coded class map, at the image's size;
- `<name>_overlay.png`: the class map blended on the image, at the image's size;
- `<name>_exit_map.png`: the image beside its exit map (which head finalised each token: green = first auxiliary
  head, red = decode head), with a legend of the token counts;
and prints the tokens that exited at each head, the classes found and the GFLOPs spent (MACs / 1e9, SPEC §5).

    python examples/segment.py photo.jpg more.png some_folder/ --model outputs/quickstart/model
    python examples/segment.py photo.jpg --model <folder|hub id> --threshold 0.8 --output_dir pictures
    python examples/segment.py big_photo.jpg --model <folder|hub id> --sliding_window   # official test mode

Images of any size and mode (grey, RGBA, palette, 16-bit) are accepted and EXIF rotation is applied; a file that is
not a readable image is reported and skipped. The exit code is non-zero only when no image could be segmented.
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation

import dtop_hf  # noqa: F401  (registers DToP with the Auto classes)
from dtop_hf.toolkit.evaluation.calibration import check_thresholds
from dtop_hf.toolkit.evaluation.loop import exits_per_stage
from dtop_hf.toolkit.evaluation.flops import (
    count_flops_from_outputs,
    flops_from_token_counts,
    sliding_window_inference_with_flops,
    tokens_seen_per_stage,
)
from dtop_hf.toolkit.inference.visualization import (
    colorize_exit_map,
    colorize_segmentation,
    compose_panels,
    default_stage_names,
    exit_stage_colours,
    make_palette,
    overlay,
)


# Suffixes looked for inside a folder (explicitly named files are always tried, whatever their suffix).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# Classes named in the printed summary of an image, largest first.
MAX_PRINTED_CLASSES = 5
# Background that transparent pixels are composited onto: the models were trained on opaque photos.
TRANSPARENT_BACKGROUND = (255, 255, 255)


@dataclass
class SegmentationResult:
    """What one image gave: maps at the image size, token exits and cost."""

    segmentation: np.ndarray  # (height, width) int64 class ids
    exit_map: np.ndarray  # (height, width) int64 head index that finalised the pixel's token
    exits: list[int]  # tokens finalised by each head, decode head last
    gflops: float  # backbone + decode head (the paper's figure)
    gflops_all_heads: float
    gflops_unpruned: float  # backbone + decode head at threshold 1.0, from the same token grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Segment images with a DToP model; write segmentation, exit-map and overlay PNGs."
    )
    parser.add_argument("inputs", type=str, nargs="+", help="Image files and/or folders of images.")
    parser.add_argument("--model", type=str, required=True, help="DToP model folder (with config.json and preprocessor_config.json) or Hub id.")
    parser.add_argument("--threshold", type=float, default=None, help="Exit threshold of the auxiliary heads in (0, 1]; 1.0 = unpruned; default: the model's own.")
    parser.add_argument("--output_dir", type=str, default="outputs/segment", help="Where the PNGs are written (default: %(default)s).")
    parser.add_argument("--sliding_window", action="store_true", help="Official test mode: shorter side resized to the processor's crop size, overlapping windows (for large images; default: off, the whole image resized to the processor's size).")
    parser.add_argument("--alpha", type=float, default=0.5, help="Opacity of the class and exit colours in the overlay pictures (default: %(default)s).")
    parser.add_argument("--figure_max_side", type=int, default=512, help="Longest side of each panel of the exit-map picture (default: %(default)s; large photos are shown smaller).")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device (default: %(default)s).")
    args = parser.parse_args(argv)
    if args.threshold is not None:
        check_thresholds([args.threshold])
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"`--alpha` must lie in [0, 1], got {args.alpha}.")
    if args.figure_max_side < 16:
        raise ValueError(f"`--figure_max_side` must be >= 16 pixels, got {args.figure_max_side}.")
    return args


def load_model_and_processor(model_name_or_path: str, device: str | torch.device = "cpu"):
    """The DToP model (eval mode, on `device`) and its image processor, with errors that say how to fix them.

    `trust_remote_code=True` lets a Hub checkpoint's own code load; with `dtop_hf` imported the local classes are
    used anyway (hf-notes §1.4).

    Raises:
        ValueError: the path is not a model folder, the model is not a DToP model, or the processor is missing.
    """
    folder = Path(model_name_or_path)
    if folder.is_file():
        raise ValueError(
            f"`--model` {model_name_or_path!r} is a file: pass the model folder (the one holding config.json and "
            "model.safetensors) or a Hub id; the images to segment come before `--model`."
        )
    if folder.is_dir() and not (folder / "config.json").is_file():
        candidates = sorted(str(path.parent) for path in folder.glob("*/config.json"))
        hint = f" Model folders inside it: {candidates}." if candidates else ""
        raise ValueError(
            f"`--model` {model_name_or_path!r} is a folder without config.json: pass the folder that holds "
            f"config.json and model.safetensors (e.g. outputs/quickstart/model).{hint}"
        )
    try:
        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load a model from `--model` {model_name_or_path!r}: it is neither a local folder nor a "
            "reachable Hub id. Pass a folder written by examples/finetune.py or examples/quickstart.py, or a Hub id "
            f"(with network access). ({error})"
        ) from error
    if config.model_type != "dtop":
        raise ValueError(
            f"`--model` {model_name_or_path!r} is a {config.model_type!r} model; segment.py draws DToP exit maps and "
            "needs a DToP model (model_type 'dtop'). Convert or fine-tune one first (see the README)."
        )
    try:
        image_processor = AutoImageProcessor.from_pretrained(model_name_or_path, trust_remote_code=True)
    except OSError as error:
        size, stride = config.image_size, 2 * config.image_size // 3  # stride 341 for 512 (SPEC §4)
        raise ValueError(
            f"`--model` {model_name_or_path!r} has no preprocessor_config.json (the image processor: resize and "
            "normalisation). Save the one the model was trained with next to it, e.g. with the defaults of "
            f"dtop-hf at the model's input size:\n  python -c \"from dtop_hf import DToPImageProcessor; "
            f"DToPImageProcessor(size={{'height': {size}, 'width': {size}}}, crop_size={{'height': {size}, "
            f"'width': {size}}}, stride={{'height': {stride}, 'width': {stride}}}).save_pretrained("
            f"'{model_name_or_path}')\""
        ) from error
    model = AutoModelForSemanticSegmentation.from_pretrained(model_name_or_path, trust_remote_code=True)
    return model.to(device).eval(), image_processor


def find_images(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files named on the command line (whatever their suffix) and the image files of named folders (sorted).

    Returns:
        The paths to try, and a message for each input that does not exist or is an empty folder.
    """
    paths, problems = [], []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(child for child in path.iterdir() if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{text}: folder without image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            problems.append(f"{text}: no such file or folder")
    return paths, problems


def open_image(path: str | Path) -> Image.Image:
    """An upright RGB image: EXIF rotation applied, grey / palette / 16-bit expanded, transparency composited on white.

    Raises:
        OSError (`PIL.UnidentifiedImageError` included): not an image, or a truncated / corrupt one.
    """
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)  # a copy, decoded fully: corrupt data raises here
        image.load()
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit or float grey: stretch to 8 bits (convert("RGB") would clip everything above 255 to white).
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        image = Image.fromarray(np.uint8(np.round(255 * (values - low) / max(high - low, 1e-12))))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, TRANSPARENT_BACKGROUND)
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


@torch.no_grad()
def segment_image(
    model: torch.nn.Module,
    image_processor,
    image: Image.Image,
    exit_threshold: float | None = None,
    sliding_window: bool = False,
) -> SegmentationResult:
    """Segment one RGB image: class map and exit map at the image's size, tokens finalised per head, GFLOPs.

    Whole-image mode resizes to the processor's `size`; sliding-window mode resizes the shorter side to the
    processor's `crop_size` (longer side at most 4x) and runs overlapping windows, as the official test mode.
    """
    config = model.config
    num_stages = len(config.out_indices)
    device = next(model.parameters()).device
    target_size = [(image.height, image.width)]
    if sliding_window:
        crop = image_processor.crop_size["height"]
        inputs = image_processor(images=image, size={"shortest_edge": crop, "longest_edge": 4 * crop}, return_tensors="pt")
        outputs, flops = sliding_window_inference_with_flops(
            image_processor, model, inputs["pixel_values"].to(device), exit_threshold=exit_threshold
        )
        tokens_per_stage, num_windows = outputs.tokens_per_stage, outputs.num_windows
    else:
        inputs = image_processor(images=image, return_tensors="pt")
        outputs = model(inputs["pixel_values"].to(device), exit_threshold=exit_threshold)
        flops = count_flops_from_outputs(config, outputs)
        tokens_per_stage, num_windows = tokens_seen_per_stage(outputs.exit_stage, num_stages), 1
    # Unpruned cost of the same input: every layer sees what the first one saw, every head every token.
    tokens_per_layer = outputs.tokens_per_layer
    unpruned = flops_from_token_counts(
        config,
        tokens_per_layer[:, :1].expand_as(tokens_per_layer),
        tokens_per_stage[:, :1].expand_as(tokens_per_stage),
        num_windows,
    )
    segmentation = image_processor.post_process_semantic_segmentation(outputs, target_sizes=target_size)[0]
    exit_map = image_processor.post_process_exit_map(outputs, target_sizes=target_size)[0]
    return SegmentationResult(
        segmentation=segmentation.cpu().numpy(),
        exit_map=exit_map.cpu().numpy(),
        exits=exits_per_stage(tokens_per_stage)[0].tolist(),
        gflops=float(flops.backbone_and_final_head[0]),
        gflops_all_heads=float(flops.total[0]),
        gflops_unpruned=float(unpruned.backbone_and_final_head[0]),
    )


def figure_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """`(width, height)` scaled down so that the longer side is at most `max_side` (never scaled up)."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def exit_map_figure(
    image: Image.Image, result: SegmentationResult, stage_names: list[str], alpha: float, max_side: int
) -> Image.Image:
    """The image beside its exit map (exit colours blended on it), with a legend of tokens finalised per head."""
    num_stages = len(stage_names)
    small = image.resize(figure_size(image.width, image.height, max_side), Image.BILINEAR)
    exit_colours = np.asarray(
        Image.fromarray(colorize_exit_map(result.exit_map, num_stages)).resize(small.size, Image.NEAREST)
    )
    total = max(sum(result.exits), 1)
    legend = [
        (f"{name}: {count} tokens ({100 * count / total:.0f}%)", tuple(int(value) for value in colour))
        for name, count, colour in zip(stage_names, result.exits, exit_stage_colours(num_stages))
    ]
    saved = 100 * (1 - result.gflops / result.gflops_unpruned) if result.gflops_unpruned else 0.0
    panels = [("image", np.asarray(small)), (f"exit map: {result.gflops:.3g} GFLOPs ({saved:.0f}% saved)", overlay(small, exit_colours, alpha))]
    return compose_panels(panels, [legend], min_panel_size=min(256, max_side))


def write_pictures(
    image: Image.Image,
    result: SegmentationResult,
    palette: np.ndarray,
    stage_names: list[str],
    output_dir: Path,
    name: str,
    alpha: float = 0.5,
    figure_max_side: int = 512,
) -> dict[str, Path]:
    """Write `<name>_segmentation.png`, `<name>_overlay.png` (both at the image size) and `<name>_exit_map.png`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    class_colours = colorize_segmentation(result.segmentation, palette)  # (height, width, 3)
    pictures = {
        "segmentation": Image.fromarray(class_colours),
        "overlay": Image.fromarray(overlay(image, class_colours, alpha)),
        "exit_map": exit_map_figure(image, result, stage_names, alpha, figure_max_side),
    }
    paths = {}
    for kind, picture in pictures.items():
        paths[kind] = output_dir / f"{name}_{kind}.png"
        picture.save(paths[kind])
    return paths


def class_summary(segmentation: np.ndarray, id2label: dict[int, str]) -> str:
    """`"sky 41%, tree 22%, ..."`: the largest classes by share of pixels."""
    counts = np.bincount(segmentation.ravel())
    order = np.argsort(-counts)[:MAX_PRINTED_CLASSES]
    return ", ".join(
        f"{id2label.get(int(class_id), str(class_id))} {100 * counts[class_id] / segmentation.size:.0f}%"
        for class_id in order
        if counts[class_id] > 0
    )


def unique_name(path: Path, used: set[str]) -> str:
    """The file's stem, made unique among the images of this run (`photo`, `photo_2`, ...)."""
    name, index = path.stem, 1
    while name in used:
        index += 1
        name = f"{path.stem}_{index}"
    used.add(name)
    return name


def describe(path: Path, image: Image.Image, result: SegmentationResult, stage_names: list[str], id2label) -> str:
    exits = ", ".join(f"{name} {count}" for name, count in zip(stage_names, result.exits))
    saved = 100 * (1 - result.gflops / result.gflops_unpruned) if result.gflops_unpruned else 0.0
    return (
        f"{path} ({image.width}x{image.height}): {sum(result.exits)} tokens; exited at {exits}\n"
        f"  GFLOPs {result.gflops:.4g} (backbone + decode head; all heads {result.gflops_all_heads:.4g}; unpruned "
        f"{result.gflops_unpruned:.4g}, {saved:.1f}% saved)\n"
        f"  classes: {class_summary(result.segmentation, id2label)}"
    )


def main(argv: list[str] | None = None) -> int:
    """Segment every image; returns the exit code (1 when no image could be segmented)."""
    args = parse_args(argv)
    try:
        model, image_processor = load_model_and_processor(args.model, args.device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = model.config
    threshold = args.threshold if args.threshold is not None else config.exit_thresholds_per_head()[:-1]
    palette = make_palette(config.num_labels)
    stage_names = default_stage_names(len(config.out_indices), config.out_indices)
    id2label = {int(key): value for key, value in config.id2label.items()}
    print(f"{args.model}: {config.num_labels} classes, heads after layers {list(config.out_indices)}, exit threshold {threshold}")

    paths, problems = find_images(args.inputs)
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    output_dir, used_names, num_done = Path(args.output_dir), set(), 0
    for path in paths:
        try:
            image = open_image(path)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
            print(f"skipped {path}: not a readable image ({type(error).__name__}: {error})", file=sys.stderr)
            continue
        result = segment_image(model, image_processor, image, args.threshold, args.sliding_window)
        written = write_pictures(
            image, result, palette, stage_names, output_dir, unique_name(path, used_names), args.alpha, args.figure_max_side
        )
        print(describe(path, image, result, stage_names, id2label))
        print("  wrote " + ", ".join(str(written_path) for written_path in written.values()))
        num_done += 1
    num_skipped = len(paths) - num_done + len(problems)
    print(f"Segmented {num_done} image(s), skipped {num_skipped}; pictures in {output_dir}")
    if num_done == 0:
        print("error: no image could be segmented (see the messages above).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
