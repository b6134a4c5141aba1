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
"""The inference toolkit the scripts share: slide mode in the evaluation loop (batched, padded, mixed window
shapes) equals the processor's own split-and-merge, image by image; the one loader's errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from dtop_hf import DToPImageProcessor
from dtop_hf.pruning import tokens_seen_per_stage
from dtop_hf.toolkit.data.datasets import collate_segmentation_batch
from dtop_hf.toolkit.evaluation.flops import count_flops_from_outputs
from dtop_hf.toolkit.evaluation.loop import evaluate_batch
from dtop_hf.toolkit.evaluation.metrics import StreamingMeanIoU
from dtop_hf.toolkit.inference.loading import load_model_and_processor
from dtop_hf.toolkit.inference.segmentation import exits_per_stage, sliding_window_processor
from dtop_hf.toolkit.inference.visualization import head_names


def random_image(height: int, width: int, seed: int) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def test_sliding_window_processor():
    processor = DToPImageProcessor(size={"height": 32, "width": 32}, crop_size=32, stride=21)
    split = sliding_window_processor(processor)
    assert split is not processor and processor.do_split_image is False
    assert split.do_split_image is True and split.size == {"shortest_edge": 32, "longest_edge": 128}
    saved_in_slide_mode = DToPImageProcessor(do_split_image=True, size={"shortest_edge": 40, "longest_edge": 160})
    assert sliding_window_processor(saved_in_slide_mode) is saved_in_slide_mode
    assert head_names((2, 5, 11)) == ["head 1 (layer 3)", "head 2 (layer 6)", "decode head (layer 12)"]
    assert head_names(3) == ["head 1", "head 2", "decode head"]


def test_evaluation_loop_in_slide_mode_equals_the_processor_image_by_image(model_tester, exit_thresholds):
    model = model_tester(num_labels=5, initializer_range=0.5).create_model()
    processor = DToPImageProcessor(
        do_split_image=True, size={"shortest_edge": 32, "longest_edge": 128}, crop_size=32, stride=21
    )
    # A wide, a tall and a very wide image (its short side ends below the crop: windows of another shape).
    images = [random_image(45, 170, 0), random_image(150, 60, 1), random_image(20, 200, 2)]
    labels = [
        torch.randint(0, 5, (image.height, image.width), generator=torch.Generator().manual_seed(3))
        for image in images
    ]
    samples = [
        {
            "pixel_values": torch.from_numpy(processor(images=image, do_split_image=False)["pixel_values"][0]),
            "labels": label,
        }
        for image, label in zip(images, labels, strict=True)
    ]
    batch = collate_segmentation_batch(samples)
    assert batch["pixel_values"].shape[-2:] == (80, 128)  # padded to the largest
    thresholds = exit_thresholds(model, processor(images=images[0], return_tensors="pt")["pixel_values"])

    results = evaluate_batch(model, batch, processor, exit_threshold=thresholds)  # the processor is in slide mode
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs, exit_threshold=thresholds)
        segmentation = processor.post_process_semantic_segmentation(outputs, target_sizes=[label.shape])[0]
        metric = StreamingMeanIoU(5)
        metric.update(segmentation, label)
        assert torch.equal(results["confusion"][index], metric.confusion)
        flops = count_flops_from_outputs(model.config, outputs)
        assert results["gflops"][index].item() == pytest.approx(flops.total.item(), rel=1e-12)
        seen = tokens_seen_per_stage(outputs.exit_stage, 3).sum(dim=0, keepdim=True)
        assert torch.equal(results["exits"][index], exits_per_stage(seen)[0])
    assert (results["exits"][:, :2] > 0).any()  # tokens left early


def test_loader_errors_name_the_argument(model_tester, tmp_path):
    folder = tmp_path / "model"
    model_tester().create_model().save_pretrained(folder)
    with pytest.raises(ValueError, match="`--model` .* has no preprocessor_config.json"):
        load_model_and_processor(str(folder), argument="--model")
    with pytest.raises(ValueError, match="is a file"):
        load_model_and_processor(str(folder / "config.json"))
    DToPImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    model, processor = load_model_and_processor(str(folder))
    assert not model.training and isinstance(processor, DToPImageProcessor)
