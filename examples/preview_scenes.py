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
"""Write previews (image | colourised label) of the built-in synthetic scenes, and optionally their statistics:
label statistics, and how well a token's own patch tells the look-alike (context) classes apart.

    python examples/preview_scenes.py --num_samples 8 --output_dir outputs/scenes --stats
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dtop_hf.toolkit.arguments import build_parser, parse_arguments, require_positive
from dtop_hf.toolkit.data.synthetic_scenes import (
    CONTEXT_CLASS_PAIRS,
    SYNTHETIC_ID2LABEL,
    SYNTHETIC_LABEL2ID,
    dataset_statistics,
    format_statistics_markdown,
    legend_image,
    make_synthetic_scenes,
    patch_classifier_accuracy,
    render_synthetic_scene_arrays,
    scene_preview,
)


# Pairs a patch alone does tell apart: the classifier's control beside the context pairs.
CONTROL_PAIRS = (("sky", "cloud"), ("grass", "tree"), ("sand", "road"))


@dataclass
class PreviewArguments:
    """Which scenes to draw, and where."""

    output_dir: str = field(metadata={"help": "Folder for the PNG previews."})
    num_samples: int = field(default=8, metadata={"help": "Number of samples to render."})
    synthetic_image_size: int = field(default=128, metadata={"help": "Square image side in pixels."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the built-in data set."})
    split: str = field(default="train", metadata={"help": "Split name; each split has its own derived seed."})
    zoom: int = field(default=3, metadata={"help": "Nearest-neighbour upscaling of the previews."})
    stats: bool = field(default=False, metadata={"help": "Also print dataset_statistics() as Markdown."})
    patch_size: int = field(default=8, metadata={"help": "Token patch side of the separability table."})

    def __post_init__(self):
        require_positive(self, ("num_samples", "synthetic_image_size", "zoom", "patch_size"))


# This script's `--seed` and `--image_size` were the built-in data set's: `--data_seed`, `--synthetic_image_size`.
DEPRECATED = {"--seed": "--data_seed", "--image_size": "--synthetic_image_size"}


def _parse_args(argv: Sequence[str] | None) -> PreviewArguments:
    parser = build_parser(
        (PreviewArguments,),
        description="Write previews (image | colourised label) of the built-in synthetic segmentation scenes.",
    )
    (args,) = parse_arguments(parser, argv, deprecated=DEPRECATED)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for index in range(args.num_samples):
        image, annotation, difficulty = render_synthetic_scene_arrays(
            index, args.synthetic_image_size, args.data_seed, args.split
        )
        path = output_dir / f"{args.split}_{index:04d}_difficulty{difficulty:.2f}.png"
        scene_preview(image, annotation, args.zoom).save(path)
    legend_image(args.zoom).save(output_dir / "legend.png")
    legend_text = ", ".join(f"{class_id}={name}" for class_id, name in SYNTHETIC_ID2LABEL.items())
    print(f"wrote {args.num_samples} previews to {output_dir} (legend.png top to bottom: {legend_text})")
    if args.stats:
        dataset = make_synthetic_scenes(args.num_samples, args.synthetic_image_size, args.data_seed, args.split)
        print(format_statistics_markdown(dataset_statistics(dataset)))
        print(separability_markdown(dataset, args.patch_size))


def separability_markdown(dataset, patch_size: int) -> str:
    """Held-out accuracy of a per-patch colour / texture classifier: ~0.5 on the context pairs, ~1.0 on others."""
    samples = [(np.asarray(row["image"]), np.asarray(row["annotation"])) for row in dataset]
    pairs = [(a, b, "context") for a, b in CONTEXT_CLASS_PAIRS]
    pairs += [(SYNTHETIC_LABEL2ID[a], SYNTHETIC_LABEL2ID[b], "control") for a, b in CONTROL_PAIRS]
    lines = [
        f"\n| pair | kind | accuracy of a {patch_size} px patch classifier (0.5 = chance) |",
        "| --- | --- | --- |",
    ]
    for first, second, kind in pairs:
        accuracy = patch_classifier_accuracy(samples, first, second, patch_size)
        lines.append(f"| {SYNTHETIC_ID2LABEL[first]} / {SYNTHETIC_ID2LABEL[second]} | {kind} | {accuracy:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
