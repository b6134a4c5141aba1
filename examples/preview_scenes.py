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
"""Write previews (image | colourised label) of the built-in synthetic scenes, and optionally their statistics.

    python examples/preview_scenes.py --num_samples 8 --output_dir outputs/scenes --stats
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from dtop_hf.toolkit.data.synthetic_scenes import (
    SYNTHETIC_ID2LABEL,
    dataset_statistics,
    format_statistics_markdown,
    legend_image,
    make_synthetic_scenes,
    render_synthetic_scene_arrays,
    scene_preview,
)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python examples/preview_scenes.py",
        description="Write previews (image | colourised label) of the built-in synthetic segmentation scenes.",
    )
    parser.add_argument("--num_samples", type=int, default=8, help="number of samples to render (default: 8)")
    parser.add_argument("--output_dir", type=Path, required=True, help="folder for the PNG previews")
    parser.add_argument("--image_size", type=int, default=128, help="square image side in pixels (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    parser.add_argument("--split", default="train", help="split name; each split has its own derived seed")
    parser.add_argument("--zoom", type=int, default=3, help="nearest-neighbour upscaling of the previews")
    parser.add_argument("--stats", action="store_true", help="also print dataset_statistics() as markdown")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for index in range(args.num_samples):
        image, annotation, difficulty = render_synthetic_scene_arrays(index, args.image_size, args.seed, args.split)
        path = args.output_dir / f"{args.split}_{index:04d}_difficulty{difficulty:.2f}.png"
        scene_preview(image, annotation, args.zoom).save(path)
    legend_image(args.zoom).save(args.output_dir / "legend.png")
    legend_text = ", ".join(f"{class_id}={name}" for class_id, name in SYNTHETIC_ID2LABEL.items())
    print(f"wrote {args.num_samples} previews to {args.output_dir} (legend.png top to bottom: {legend_text})")
    if args.stats:
        print(format_statistics_markdown(dataset_statistics(
            make_synthetic_scenes(args.num_samples, args.image_size, args.seed, args.split))))


if __name__ == "__main__":
    main()
