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
"""Export a DToP model to one ONNX file that runs at every batch size, in capacity or threshold mode.

    python examples/export_onnx.py --model_name_or_path outputs/quickstart/calibrated --output model.onnx \\
        --image_size 96 96 --exit_mode capacity --exit_capacity 0.5,0.3

The file has the input `pixel_values` (batch, channels, height, width), with any batch size, and the outputs
`logits` and `exit_stage`; the exit rule, the input size and the model folder's image processor settings are
recorded inside it (ONNX metadata `dtop`), for `dtop_hf.toolkit.deploy.onnx_runtime.segment_with_onnx`. After the
export, the file runs in ONNX Runtime next to the PyTorch model at a few batch sizes (`--check_batch_sizes`).

Threshold mode exports too (`--exit_threshold 0.9,0.8`): each image keeps its own tokens, and the file pads every
batch to the token count of its image that keeps the most, so at batch 1 it runs exactly the tokens PyTorch runs and at
larger batches the easy images pay for the hardest. Capacity mode has the same cost for every image, known from the
capacities alone; threshold 1.0 is the unpruned model. Needs the `onnx` extra: pip install "dtop-hf[onnx]".
"""

from dataclasses import dataclass, field
from pathlib import Path

from dtop_hf.toolkit.arguments import ExitArguments, ModelArguments, build_parser, parse_arguments
from dtop_hf.toolkit.deploy.onnx_export import (
    DEFAULT_OPSET,
    DToPExportError,
    export_onnx,
    exportable_exit_rule,
    read_onnx_metadata,
)
from dtop_hf.toolkit.deploy.onnx_runtime import compare_with_pytorch, create_session
from dtop_hf.toolkit.evaluation.flops import flops_from_capacities
from dtop_hf.toolkit.evaluation.report import format_gflops
from dtop_hf.toolkit.inference.loading import load_dtop_config, load_model_and_processor


@dataclass
class ExportArguments:
    """Where the exported file goes and what it is traced for."""

    output: str = field(default="model.onnx", metadata={"help": "The .onnx file to write."})
    image_size: list[int] | None = field(
        default=None,
        metadata={"help": "Input height and width (one value: square). Default: the image processor's size."},
    )
    opset_version: int = field(default=DEFAULT_OPSET, metadata={"help": "ONNX opset."})
    check_batch_sizes: list[int] = field(
        default_factory=lambda: [1, 2],
        metadata={"help": "Compare ONNX Runtime with PyTorch at these batch sizes after the export (0: skip)."},
    )

    def __post_init__(self):
        if self.image_size is not None and len(self.image_size) not in (1, 2):
            raise ValueError(f"`--image_size` takes a height and a width (or one side), got {self.image_size}.")
        if self.image_size is not None and len(self.image_size) == 1:
            self.image_size = self.image_size * 2
        self.check_batch_sizes = [size for size in self.check_batch_sizes if size > 0]


def describe_export(model_file: Path, config) -> str:
    """One line: what the file computes, and its GFLOPs per image in capacity mode."""
    metadata = read_onnx_metadata(model_file)
    height, width = metadata["image_size"]
    rule = f"{metadata['exit_mode']} mode, " + (
        f"exit_capacity {metadata['exit_capacity']}"
        if metadata["exit_mode"] == "capacity"
        else f"exit_threshold {metadata['exit_threshold']}"
    )
    line = f"Wrote {model_file} ({rule}; {height}x{width} inputs, any batch size)"
    if metadata["exit_mode"] == "threshold" and min(metadata["exit_threshold"], default=1.0) < 1.0:
        line += "; each batch is padded to the tokens of its image that keeps the most"
    if metadata["exit_mode"] == "capacity":
        pruned = flops_from_capacities(config, (height, width), metadata["exit_capacity"]).total.item()
        unpruned = flops_from_capacities(config, (height, width), 1.0).total.item()
        # The report's formatter: a tiny model's 0.0018 GFLOPs would print as 0.00 with a fixed two decimals.
        line += (
            f"; {format_gflops(pruned)} GFLOPs per image, unpruned {format_gflops(unpruned)} "
            f"(R = {unpruned / pruned:.3f})"
        )
    return line + "."


def main(argv: list[str] | None = None) -> Path:
    parser = build_parser((ModelArguments, ExitArguments, ExportArguments), description=__doc__.split("\n")[0])
    model_args, exit_args, export_args = parse_arguments(parser, argv, required=["model_name_or_path"])
    # Checked before the weights load.
    exit_rule = exportable_exit_rule(load_dtop_config(model_args.model_name_or_path), **exit_args.model_kwargs())
    model, image_processor = load_model_and_processor(model_args.model_name_or_path)
    try:
        model_file = export_onnx(
            model,
            export_args.output,
            image_size=export_args.image_size,
            image_processor=image_processor,
            opset_version=export_args.opset_version,
            **exit_rule,
        )
    except DToPExportError as error:  # one line, no traceback, saying what to export instead
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(describe_export(model_file, model.config))
    if export_args.check_batch_sizes:
        difference = compare_with_pytorch(create_session(model_file), model, export_args.check_batch_sizes)
        sizes = ", ".join(map(str, export_args.check_batch_sizes))
        print(f"ONNX Runtime vs PyTorch at batch sizes {sizes}: same exit_stage, logits max |diff| {difference:.1e}.")
    return model_file


if __name__ == "__main__":
    main()
