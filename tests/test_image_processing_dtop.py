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
"""Tests of DToPImageProcessor: preprocessing, labels, post-processing back to image size, sliding windows."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dtop_hf import DToPImageProcessor
from dtop_hf.image_processing_dtop import window_starts


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


class ConstantModel(torch.nn.Module):
    """Stands in for a DToP model whose scores are the same for every token of every window."""

    def __init__(self, scores: torch.Tensor, head_type: str = "atm", patch_size: int = 4):
        super().__init__()
        self.config = SimpleNamespace(
            head_type=head_type, num_labels=len(scores), num_hidden_layers=2, out_indices=(0, 1)
        )
        self.scores, self.patch_size = scores, patch_size
        self.calls = []

    def forward(self, pixel_values, exit_threshold=None):
        self.calls.append(tuple(pixel_values.shape))
        batch_size, _, height, width = pixel_values.shape
        grid = (height // self.patch_size, width // self.patch_size)
        return SimpleNamespace(
            logits=self.scores[None, :, None, None].expand(batch_size, -1, *grid),
            exit_stage=torch.ones(batch_size, *grid, dtype=torch.long),
            tokens_per_layer=torch.full((batch_size, 2), grid[0] * grid[1]),
        )


def test_defaults_are_dtops():
    processor = DToPImageProcessor()
    assert processor.size == {"height": 512, "width": 512}
    assert processor.crop_size == {"height": 512, "width": 512} and processor.stride == {"height": 341, "width": 341}
    assert tuple(processor.image_mean) == IMAGENET_MEAN and tuple(processor.image_std) == IMAGENET_STD
    assert processor.do_reduce_labels is False


def test_resize_rescale_normalize():
    processor = DToPImageProcessor(size={"height": 32, "width": 24})
    colour = (200, 100, 50)
    image = Image.new("RGB", (70, 45), colour)  # PIL size is (width, height)
    pixel_values = processor(images=[image, random_image(20, 90)], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, 32, 24) and pixel_values.dtype == torch.float32
    expected = [
        (value / 255 - mean) / std for value, mean, std in zip(colour, IMAGENET_MEAN, IMAGENET_STD, strict=True)
    ]
    torch.testing.assert_close(pixel_values[0].mean(dim=(1, 2)), torch.tensor(expected), rtol=0, atol=1e-5)
    torch.testing.assert_close(pixel_values[0].std(dim=(1, 2)), torch.zeros(3), rtol=0, atol=1e-5)


def test_segmentation_maps_become_labels_with_and_without_reduce_labels():
    segmentation = np.array([[0, 0, 1, 1, 2, 2, 255, 255]] * 4, dtype=np.uint8)
    image = random_image(4, 8)
    plain = DToPImageProcessor(size={"height": 4, "width": 8})
    labels = plain(images=image, segmentation_maps=Image.fromarray(segmentation), return_tensors="pt")["labels"]
    assert labels.dtype == torch.int64 and labels.shape == (1, 4, 8)
    assert labels[0, 0].tolist() == [0, 0, 1, 1, 2, 2, 255, 255]  # never rescaled or normalised
    reducing = DToPImageProcessor(size={"height": 4, "width": 8}, do_reduce_labels=True)
    labels = reducing(images=image, segmentation_maps=Image.fromarray(segmentation), return_tensors="pt")["labels"]
    # ADE20K convention: 0 = unlabelled -> ignore index 255, class k -> k - 1; 255 stays ignored.
    assert labels[0, 0].tolist() == [255, 255, 0, 0, 1, 1, 255, 255]
    # Label maps are resized with nearest neighbour: no new label values appear.
    halving = DToPImageProcessor(size={"height": 2, "width": 4}, do_reduce_labels=True)
    labels = halving(images=image, segmentation_maps=Image.fromarray(segmentation), return_tensors="pt")["labels"]
    assert labels.shape == (1, 2, 4) and set(labels.unique().tolist()) <= {255, 0, 1}


def test_post_process_semantic_segmentation_maps_back_to_the_original_size():
    processor = DToPImageProcessor(size={"height": 32, "width": 32})
    logits = torch.randn(2, 5, 8, 8)
    outputs = {"logits": logits}
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[(45, 70), (8, 8)])
    assert [tuple(segmentation.shape) for segmentation in maps] == [(45, 70), (8, 8)]
    assert all(segmentation.dtype == torch.int64 for segmentation in maps)
    # As the official code: grid -> network input size -> original size, both bilinear, then argmax.
    at_input_size = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    for segmentation, target_size, scores in zip(maps, [(45, 70), (8, 8)], at_input_size, strict=True):
        expected = F.interpolate(scores[None], size=target_size, mode="bilinear", align_corners=False).argmax(dim=1)
        assert torch.equal(segmentation, expected[0])
    # Without a fixed input size (no resizing), one bilinear step.
    unresized = DToPImageProcessor(do_resize=False)
    single_step = unresized.post_process_semantic_segmentation(outputs, target_sizes=[(45, 70), (8, 8)])
    expected = F.interpolate(logits[:1], size=(45, 70), mode="bilinear", align_corners=False).argmax(dim=1)[0]
    assert torch.equal(single_step[0], expected) and torch.equal(single_step[1], logits[1].argmax(dim=0))
    # Without target sizes: the token grid.
    native = processor.post_process_semantic_segmentation(outputs)
    assert all(
        torch.equal(segmentation, item.argmax(dim=0)) for segmentation, item in zip(native, logits, strict=True)
    )
    scored = processor.post_process_semantic_segmentation(
        outputs, target_sizes=[(45, 70), (8, 8)], return_segmentation_scores=True
    )
    assert torch.equal(scored[0].segmentation, maps[0]) and scored[0].segmentation_scores.shape == (5, 45, 70)
    with pytest.raises(ValueError):
        processor.post_process_semantic_segmentation(outputs, target_sizes=[(45, 70)])


def test_post_process_exit_map():
    processor = DToPImageProcessor()
    exit_stage = torch.randint(0, 3, (2, 8, 6))
    maps = processor.post_process_exit_map({"exit_stage": exit_stage}, target_sizes=[(32, 24), (45, 70)])
    assert [tuple(exit_map.shape) for exit_map in maps] == [(32, 24), (45, 70)]
    assert all(exit_map.dtype == torch.int64 for exit_map in maps)
    # Nearest upsampling: every pixel shows the stage of the token it lies in.
    assert torch.equal(maps[0], exit_stage[0].repeat_interleave(4, dim=0).repeat_interleave(4, dim=1))
    assert set(maps[1].unique().tolist()) <= set(exit_stage[1].unique().tolist())
    assert all(
        torch.equal(a, b)
        for a, b in zip(processor.post_process_exit_map({"exit_stage": exit_stage}), exit_stage, strict=True)
    )
    with pytest.raises(ValueError, match="2 target sizes for a batch of 1|one per image"):
        processor.post_process_exit_map({"exit_stage": exit_stage[:1]}, target_sizes=[(1, 1), (2, 2)])


def test_processor_with_a_real_model_gives_maps_at_image_size(model_tester):
    model = model_tester().create_model()
    processor = DToPImageProcessor(size={"height": 32, "width": 32})
    images = [random_image(45, 70), random_image(50, 30, seed=1)]
    with torch.no_grad():
        outputs = model(**processor(images=images, return_tensors="pt"))
    sizes = [image.size[::-1] for image in images]  # PIL (width, height) -> (height, width)
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
    exit_maps = processor.post_process_exit_map(outputs, target_sizes=sizes)
    assert [tuple(item.shape) for item in maps] == [tuple(item.shape) for item in exit_maps] == [(45, 70), (50, 30)]


def test_save_and_load_keeps_the_sliding_window_settings(tmp_path):
    processor = DToPImageProcessor(
        size={"height": 64, "width": 64},
        crop_size={"height": 48, "width": 40},
        stride={"height": 30, "width": 20},
        do_reduce_labels=True,
    )
    processor.save_pretrained(tmp_path)
    reloaded = DToPImageProcessor.from_pretrained(tmp_path)
    assert reloaded.crop_size == {"height": 48, "width": 40} and reloaded.stride == {"height": 30, "width": 20}
    assert reloaded.size == {"height": 64, "width": 64} and reloaded.do_reduce_labels is True


# --- sliding-window inference ----------------------------------------------------------------------------------


def test_window_starts_cover_the_image_with_the_last_window_flush():
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(100, 32, 16) == [0, 16, 32, 48, 64, 68]
    assert window_starts(683, 512, 341) == [0, 171]
    assert window_starts(20, 32, 16) == [0]
    for length, crop, stride in [(100, 32, 16), (683, 512, 341), (2048, 512, 341), (40, 32, 10)]:
        starts = window_starts(length, crop, stride)
        assert starts[-1] + crop == length and all(b - a <= stride for a, b in zip(starts, starts[1:], strict=False))


@pytest.mark.parametrize("head_type", ["atm", "fcn"])
@pytest.mark.parametrize("size", [(50, 37), (20, 50), (32, 32)])
def test_constant_model_averages_to_the_constant(head_type, size):
    scores = torch.tensor([0.2, 1.5, -0.3])
    model = ConstantModel(scores, head_type=head_type)
    processor = DToPImageProcessor(crop_size={"height": 32, "width": 32}, stride={"height": 10, "width": 12})
    result = processor.sliding_window_inference(model, torch.randn(2, 3, *size), batch_size=3)
    expected = scores if head_type == "atm" else scores.softmax(dim=0)  # FCN logits are averaged as probabilities
    assert result.logits.shape == (2, 3, *size) and result.exit_stage.shape == (2, *size)
    torch.testing.assert_close(
        result.logits, expected[None, :, None, None].expand_as(result.logits), rtol=0, atol=1e-6
    )
    padded = (max(size[0], 32), max(size[1], 32))
    num_windows = len(window_starts(padded[0], 32, 10)) * len(window_starts(padded[1], 32, 12))
    assert result.num_windows == num_windows and len(model.calls) == -(-2 * num_windows // 3)
    assert all(call[1:] == (3, 32, 32) for call in model.calls)
    assert (result.tokens_per_layer == num_windows * 64).all()


def test_crop_of_the_image_size_is_whole_image_inference(model_tester, exit_thresholds, varied_images, head_type):
    model = model_tester(head_type=head_type).create_model()
    pixel_values = varied_images(2)
    thresholds = exit_thresholds(model, pixel_values)
    processor = DToPImageProcessor(crop_size={"height": 32, "width": 32}, stride={"height": 20, "width": 20})
    result = processor.sliding_window_inference(model, pixel_values, exit_threshold=thresholds)
    with torch.no_grad():
        outputs = model(pixel_values, exit_threshold=thresholds)
    scores = outputs.logits if head_type == "atm" else outputs.logits.softmax(dim=1)
    expected = F.interpolate(scores, size=(32, 32), mode="bilinear", align_corners=False)
    assert result.num_windows == 1
    torch.testing.assert_close(result.logits, expected, rtol=0, atol=1e-6)
    assert torch.equal(result.exit_stage, outputs.exit_stage.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2))
    assert torch.equal(result.tokens_per_layer, outputs.tokens_per_layer)
    exit_stage = outputs.exit_stage.flatten(1)
    expected_per_stage = torch.stack([(exit_stage >= stage).sum(dim=1) for stage in range(3)], dim=1)
    assert torch.equal(result.tokens_per_stage, expected_per_stage)


def test_overlapping_windows_average_the_window_probabilities(model_tester, exit_thresholds, varied_images):
    model = model_tester().create_model()
    pixel_values = varied_images(2, image_size=48)[..., :40]  # (2, 3, 48, 40): windows overlap both ways
    thresholds = exit_thresholds(model, pixel_values[..., :32, :32])
    processor = DToPImageProcessor(crop_size={"height": 32, "width": 32}, stride={"height": 16, "width": 16})
    result = processor.sliding_window_inference(model, pixel_values, exit_threshold=thresholds, batch_size=3)

    # Reference: every window alone, its probabilities upsampled to the crop, summed, divided by the coverage.
    tops, lefts = window_starts(48, 32, 16), window_starts(40, 32, 16)
    assert (tops, lefts) == ([0, 16], [0, 8])
    total = torch.zeros(2, 5, 48, 40)
    coverage = torch.zeros(48, 40)
    tokens_per_layer = torch.zeros(2, 4, dtype=torch.long)
    for top in tops:
        for left in lefts:
            with torch.no_grad():
                window = model(pixel_values[..., top : top + 32, left : left + 32], exit_threshold=thresholds)
            total[..., top : top + 32, left : left + 32] += F.interpolate(
                window.logits, size=(32, 32), mode="bilinear", align_corners=False
            )
            coverage[top : top + 32, left : left + 32] += 1
            tokens_per_layer += window.tokens_per_layer
    assert coverage.min() == 1 and coverage.max() == 4
    assert result.num_windows == 4
    torch.testing.assert_close(result.logits, total / coverage, rtol=0, atol=1e-5)
    assert torch.equal(result.tokens_per_layer, tokens_per_layer)
    assert (result.tokens_per_layer[:, -1] < 4 * 64).all()  # the windows pruned
    # The window batch size is a memory knob only.
    one_at_a_time = processor.sliding_window_inference(model, pixel_values, exit_threshold=thresholds, batch_size=1)
    torch.testing.assert_close(one_at_a_time.logits, result.logits, rtol=0, atol=1e-5)
    assert torch.equal(one_at_a_time.exit_stage, result.exit_stage)


def test_sliding_window_rejects_bad_strides():
    processor = DToPImageProcessor(crop_size={"height": 32, "width": 32})
    model = ConstantModel(torch.zeros(3))
    for stride in ({"height": 0, "width": 16}, {"height": 16, "width": 33}):
        with pytest.raises(ValueError, match="`stride` must be in"):
            processor.sliding_window_inference(model, torch.randn(1, 3, 40, 40), stride=stride)
