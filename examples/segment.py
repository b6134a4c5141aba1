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
and the GFLOPs spent (GFLOPs = multiply-accumulates / 1e9 per image, see docs/flops.md), then a summary.

    python examples/segment.py photo.jpg more.png some_folder/ --model_name_or_path outputs/quickstart/model
    python examples/segment.py photo.jpg --model_name_or_path <folder|hub id> --exit_threshold 0.8 --output_dir pics
    python examples/segment.py big_photo.jpg --model_name_or_path <folder|hub id> --sliding_window  # test mode

A large folder, on every GPU, resumable (images whose outputs exist are skipped; `--overwrite` redoes them):

    accelerate launch examples/segment.py folder/ --model_name_or_path <folder|hub id> \\
        --per_device_eval_batch_size 8 --no_pictures

Images of any size and mode (grey, RGBA, palette, 16-bit) are accepted and EXIF rotation is applied; a file that is
not a readable image is reported and skipped. The exit code is non-zero only when no image could be segmented.
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from dtop_hf.toolkit.arguments import ExitArguments, ModelArguments, RuntimeArguments, build_parser, parse_arguments
from dtop_hf.toolkit.inference.images import find_images, unique_names
from dtop_hf.toolkit.inference.loading import load_model_and_processor
from dtop_hf.toolkit.inference.segment_files import plan_batches, run_summary, segment_batch
from dtop_hf.toolkit.inference.segmentation import sliding_window_processor
from dtop_hf.toolkit.inference.visualization import head_names, make_palette
from dtop_hf.toolkit.runtime import partial_state_session


@dataclass
class SegmentArguments:
    """Where the pictures go and how they look."""

    output_dir: str = field(default="outputs/segment", metadata={"help": "Where the PNGs are written."})
    sliding_window: bool = field(
        default=False,
        metadata={
            "help": "Official test mode: aspect ratio kept (shorter side at the processor's crop size), overlapping "
            "windows, for large images. Off: the whole image resized to the processor's size, unless the processor "
            "was saved in slide mode."
        },
    )
    no_pictures: bool = field(
        default=False, metadata={"help": "Write only the class maps (<name>_classes.png), not the colour pictures."}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Segment images whose outputs already exist (default: skip them, so that a run resumes)."},
    )
    alpha: float = field(default=0.5, metadata={"help": "Opacity of the class and exit colours in the overlays."})
    figure_max_side: int = field(
        default=512, metadata={"help": "Longest side of each panel of the exit-map picture (large photos smaller)."}
    )

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"`--alpha` must lie in [0, 1], got {self.alpha}.")
        if self.figure_max_side < 16:
            raise ValueError(f"`--figure_max_side` must be >= 16 pixels, got {self.figure_max_side}.")


def parse_args(argv: list[str] | None = None) -> tuple:
    parser = build_parser(
        (ModelArguments, ExitArguments, RuntimeArguments, SegmentArguments),
        description="Segment images with a DToP model; write class-map, segmentation, exit-map and overlay PNGs.",
        per_device_eval_batch_size=1,
    )
    parser.add_argument("inputs", type=str, nargs="+", help="Image files and/or folders of images.")
    return parse_arguments(parser, argv, required=["model_name_or_path"], check=check_one_exit_setting)


def check_one_exit_setting(model_args, exit_args: ExitArguments, *others) -> None:
    """One exit setting per run: sweeping several is the evaluation script's job."""
    exit_args.model_kwargs()


def main(argv: list[str] | None = None) -> int:
    """Segment every image (split across the processes of `accelerate launch`); returns the exit code (1 when no
    image could be segmented and none was already done, 2 when the model cannot be loaded)."""
    model_args, exit_args, runtime_args, segment_args, inputs = parse_args(argv)
    with partial_state_session(**runtime_args.accelerator_kwargs()) as state:
        try:
            model, image_processor = load_model_and_processor(model_args.model_name_or_path, state.device)
        except ValueError as error:
            if state.is_main_process:
                print(f"error: {error}", file=sys.stderr)
            return 2
        if segment_args.sliding_window:
            image_processor = sliding_window_processor(image_processor)
        config, output_dir = model.config, Path(segment_args.output_dir)
        stage_names = head_names(config.out_indices)
        id2label = {int(key): value for key, value in config.id2label.items()}
        exit_settings = exit_args.model_kwargs()
        write_options = {"palette": make_palette(config.num_labels), "pictures": not segment_args.no_pictures}
        write_options.update(alpha=segment_args.alpha, figure_max_side=segment_args.figure_max_side)

        paths, problems = find_images(inputs.inputs)
        batches, num_done, unreadable = plan_batches(
            paths, unique_names(paths), output_dir, runtime_args.per_device_eval_batch_size,
            pictures=not segment_args.no_pictures, overwrite=segment_args.overwrite,
        )  # fmt: skip
        state.wait_for_everyone()  # every process plans before any writes, so that all agree on what is left to do
        threshold = exit_settings.get("exit_threshold", config.exit_thresholds_per_head()[:-1])
        if state.is_main_process:
            print(
                f"{model_args.model_name_or_path}: {config.num_labels} classes, heads after layers "
                f"{list(config.out_indices)}, exit threshold {threshold}; {sum(map(len, batches))} image(s) to "
                f"segment on {state.num_processes} process(es)"
            )
        start, records = time.perf_counter(), []
        with state.split_between_processes(batches) as own_batches:
            for batch in tqdm(own_batches, desc="segmenting", unit="batch", disable=not state.is_main_process):
                records += segment_batch(
                    model, image_processor, batch, output_dir, stage_names, id2label, exit_settings, **write_options
                )
        records = sorted(gather_object(records), key=lambda record: record["index"])
        seconds, is_main_process = time.perf_counter() - start, state.is_main_process
    if not is_main_process:  # the session has ended the processes' state: read before
        return 0
    return report(records, problems + unreadable, num_done, seconds, stage_names, segment_args.output_dir)


def report(records: list[dict], problems: list[str], num_done: int, seconds: float, stage_names, output_dir) -> int:
    """Print each image's lines, the skipped files and the summary; the exit code."""
    for record in records:
        if "description" in record:
            print(record["description"])
    problems = problems + [record["problem"] for record in records if "problem" in record]
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    print(run_summary(records, num_done, len(problems), seconds, stage_names, output_dir))
    if num_done == 0 and not any("description" in record for record in records):
        print("error: no image could be segmented (see the messages above).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
