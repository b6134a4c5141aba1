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

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import pipeline

from dtop_hf import DToPImageProcessor
from dtop_hf.image_processing_dtop import argmax_among, classes_that_can_win, keep_ratio_size, window_starts


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_defaults_are_dtops():
    processor = DToPImageProcessor()
    assert processor.size == {"height": 512, "width": 512}
    assert processor.crop_size == {"height": 512, "width": 512} and processor.stride == {"height": 341, "width": 341}
    assert processor.do_split_image is False and processor.patch_size is None
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
    assert reloaded.do_split_image is False
    slide = DToPImageProcessor(do_split_image=True, size={"shortest_edge": 520, "longest_edge": 2048}, crop_size=480)
    slide.save_pretrained(tmp_path / "slide")
    reloaded = DToPImageProcessor.from_pretrained(tmp_path / "slide")
    assert reloaded.do_split_image is True and reloaded.size == {"shortest_edge": 520, "longest_edge": 2048}
    assert reloaded.crop_size == {"height": 480, "width": 480} and reloaded.stride == {"height": 341, "width": 341}
    # Without a size, slide mode keeps the ratio with the shorter side at the crop and the longer at most 4x that.
    assert DToPImageProcessor(do_split_image=True, crop_size=32).size == {"shortest_edge": 32, "longest_edge": 128}


# --- slide mode (the official test mode, EoMT's convention) ------------------------------------------------------

SLIDE = {"crop_size": {"height": 32, "width": 32}, "stride": {"height": 21, "width": 21}}


def test_window_starts_cover_the_image_with_the_last_window_flush():
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(100, 32, 16) == [0, 16, 32, 48, 64, 68]
    assert window_starts(683, 512, 341) == [0, 171]
    assert window_starts(20, 32, 16) == [0]
    for length, crop, stride in [(100, 32, 16), (683, 512, 341), (2048, 512, 341), (40, 32, 10)]:
        starts = window_starts(length, crop, stride)
        assert starts[-1] + crop == length and all(b - a <= stride for a, b in zip(starts, starts[1:], strict=False))
        # mmseg's grid count
        assert len(starts) == max(length - crop + stride - 1, 0) // stride + 1


def test_keep_ratio_resize_is_the_official_one():
    # scale = min(long / long side, short / short side), sides rounded half up (mmcv's rescale_size).
    assert keep_ratio_size((512, 683), 512, 2048) == (512, 683)
    assert keep_ratio_size((300, 400), 512, 2048) == (512, 683)  # 682.67 -> 683
    assert keep_ratio_size((400, 300), 520, 2048) == (693, 520)
    assert keep_ratio_size((100, 1000), 512, 2048) == (205, 2048)  # the long side caps the scale (2.048)
    processor = DToPImageProcessor(size={"shortest_edge": 32, "longest_edge": 128})
    pixel_values = processor(images=[random_image(45, 170), random_image(20, 200)])["pixel_values"]
    assert [item.shape[-2:] for item in pixel_values] == [(32, 121), (13, 128)]


def test_split_images_into_windows_with_their_patch_offsets():
    processor = DToPImageProcessor(do_split_image=True, **SLIDE)
    assert processor.size == {"shortest_edge": 32, "longest_edge": 128}
    images = [random_image(45, 170), random_image(170, 45, seed=1)]
    inputs = processor(images=images, return_tensors="pt")
    whole = processor(images=images, do_split_image=False)["pixel_values"]
    assert [item.shape[-2:] for item in whole] == [(32, 121), (121, 32)]
    starts = window_starts(121, 32, 21)
    assert len(starts) == 6 and inputs["pixel_values"].shape == (12, 3, 32, 32)
    offsets = [offset.tolist() for offset in inputs["patch_offsets"]]
    assert offsets[:6] == [[0, 0, 32, start, start + 32] for start in starts]  # wide: along the width
    assert offsets[6:] == [[1, start, start + 32, 0, 32] for start in starts]  # tall: along the height
    for window, (index, top, bottom, left, right) in zip(inputs["pixel_values"], offsets, strict=True):
        assert torch.equal(window, torch.from_numpy(whole[index][:, top:bottom, left:right]))
    # A short side longer than the crop gives a grid of windows (Pascal Context: 520 short side, 480 crop).
    grid = DToPImageProcessor(do_split_image=True, size={"shortest_edge": 40, "longest_edge": 160}, **SLIDE)
    offsets = grid(images=random_image(60, 100), return_tensors="pt")["patch_offsets"]  # resized to 40 x 67
    assert len(offsets) == len(window_starts(40, 32, 21)) * len(window_starts(67, 32, 21)) == 2 * 3
    with pytest.raises(ValueError, match="segmentation_maps"):
        processor(images=images[0], segmentation_maps=Image.new("L", (170, 45)))
    with pytest.raises(ValueError, match="shortest_edge"):
        processor(images=images[0], size={"height": 32, "width": 32})
    with pytest.raises(ValueError, match="one at a time"):  # the second image's short side (13) is below the crop
        processor(images=[images[0], random_image(20, 200)], return_tensors="pt")


@pytest.mark.parametrize("size", [(50, 37), (20, 50), (32, 32)])
def test_constant_window_scores_merge_to_the_constant(size):
    processor = DToPImageProcessor(crop_size={"height": 32, "width": 32}, stride={"height": 10, "width": 12})
    windows, offsets = processor.split_image(torch.randn(3, *size))
    num_windows = len(window_starts(size[0], 32, 10)) * len(window_starts(size[1], 32, 12))
    assert len(windows) == len(offsets) == num_windows
    # A side shorter than the crop gets one window of its own length (nothing padded).
    assert all(window.shape[-2:] == (min(size[0], 32), min(size[1], 32)) for window in windows)
    # Scores (any sign: FCN logits are averaged as the head returns them) equal in every window.
    scores = torch.tensor([0.2, 1.5, -0.3])
    grid = (-(-windows[0].shape[-2] // 4), -(-windows[0].shape[-1] // 4))
    window_scores = scores[None, :, None, None].expand(num_windows, -1, *grid)
    merged = processor.merge_windows(window_scores, [torch.tensor(offset) for offset in offsets])
    assert len(merged) == 1 and merged[0].shape == (3, *size)
    torch.testing.assert_close(merged[0], scores[:, None, None].expand(3, *size), rtol=0, atol=1e-6)


def test_bad_strides_raise():
    for stride in ({"height": 0, "width": 16}, {"height": 16, "width": 33}):
        processor = DToPImageProcessor(crop_size={"height": 32, "width": 32}, stride=stride)
        with pytest.raises(ValueError, match="`stride` must be in"):
            processor.split_image(torch.randn(3, 40, 40))


def run_windows(model, processor, pixel_values, exit_threshold=None):
    """Each image of `pixel_values` cut into windows, all windows in one forward pass (the model's output)."""
    windows, offsets = [], []
    for index, image in enumerate(pixel_values):
        image_windows, image_offsets = processor.split_image(image, index)
        windows += image_windows
        offsets += [torch.tensor(offset) for offset in image_offsets]
    with torch.no_grad():
        return model(torch.stack(windows), exit_threshold=exit_threshold, patch_offsets=offsets)


def test_crop_of_the_image_size_is_whole_image_inference(model_tester, exit_thresholds, varied_images, head_type):
    model = model_tester(head_type=head_type).create_model()
    pixel_values = varied_images(2)
    thresholds = exit_thresholds(model, pixel_values)
    processor = DToPImageProcessor(size={"height": 32, "width": 32}, crop_size=32, stride=20)
    split = run_windows(model, processor, pixel_values, thresholds)
    with torch.no_grad():
        whole = model(pixel_values, exit_threshold=thresholds)
    assert [offset.tolist() for offset in split.patch_offsets] == [[0, 0, 32, 0, 32], [1, 0, 32, 0, 32]]
    sizes = [(45, 70), (32, 32)]
    merged = processor.post_process_semantic_segmentation(split, sizes, return_segmentation_scores=True)
    expected = processor.post_process_semantic_segmentation(whole, sizes, return_segmentation_scores=True)
    for item, reference in zip(merged, expected, strict=True):
        torch.testing.assert_close(item.segmentation_scores, reference.segmentation_scores, rtol=0, atol=1e-6)
    exit_maps = processor.post_process_exit_map(split, target_sizes=[(32, 32)] * 2)
    assert torch.equal(
        torch.stack(exit_maps), whole.exit_stage.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    )


def test_overlapping_windows_average_the_window_scores(model_tester, exit_thresholds, varied_images):
    model = model_tester().create_model()
    pixel_values = varied_images(2, image_size=48)[..., :40]  # (2, 3, 48, 40): windows overlap both ways
    thresholds = exit_thresholds(model, pixel_values[..., :32, :32])
    processor = DToPImageProcessor(crop_size={"height": 32, "width": 32}, stride={"height": 16, "width": 16})
    outputs = run_windows(model, processor, pixel_values, thresholds)

    # Reference: every window alone, its scores upsampled to the crop, summed, divided by the coverage.
    tops, lefts = window_starts(48, 32, 16), window_starts(40, 32, 16)
    assert (tops, lefts) == ([0, 16], [0, 8])
    total = torch.zeros(2, 5, 48, 40)
    coverage = torch.zeros(48, 40)
    window_exits = []
    for image in range(2):
        for top in tops:
            for left in lefts:
                with torch.no_grad():
                    crop = pixel_values[image : image + 1, :, top : top + 32, left : left + 32]
                    window = model(crop, exit_threshold=thresholds)
                total[image, :, top : top + 32, left : left + 32] += F.interpolate(
                    window.logits, size=(32, 32), mode="bilinear", align_corners=False
                )[0]
                coverage[top : top + 32, left : left + 32] += 1 / 2  # counted once per image
                window_exits.append(window.exit_stage)
    assert coverage.min() == 1 and coverage.max() == 4
    merged = processor.post_process_semantic_segmentation(outputs, [(48, 40)] * 2, return_segmentation_scores=True)
    torch.testing.assert_close(
        torch.stack([item.segmentation_scores for item in merged]), total / coverage, rtol=0, atol=1e-5
    )
    assert torch.equal(outputs.exit_stage, torch.cat(window_exits))  # each window pruned as if alone
    assert (outputs.tokens_per_layer[:, -1] < 64).any()  # the windows pruned
    # The last window covering a pixel gives its exit stage.
    exit_map = processor.post_process_exit_map(outputs, target_sizes=[(48, 40)] * 2)[1]
    last = window_exits[-1][0].repeat_interleave(4, dim=0).repeat_interleave(4, dim=1)
    assert torch.equal(exit_map[16:, 8:], last)


def mmseg_slide_inference(model, image: Image.Image, scale: tuple[int, int], crop: int, stride: int, exit_threshold):
    """A plain re-implementation of mmseg's test mode, written from its code: `Resize(scale, keep_ratio=True)`,
    `slide_inference` (windows, scores summed and divided by the overlap count) and `postprocess_result` (one
    bilinear resize to the original size, argmax)."""
    long_edge, short_edge = scale
    width, height = image.size
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    new_width, new_height = int(width * factor + 0.5), int(height * factor + 0.5)
    pixels = np.asarray(image.resize((new_width, new_height), Image.BILINEAR), dtype=np.float32) / 255
    pixels = (pixels - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    inputs = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    h_img, w_img = inputs.shape[-2:]
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    preds = torch.zeros(1, model.config.num_labels, h_img, w_img)
    count_mat = torch.zeros(1, 1, h_img, w_img)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            with torch.no_grad():
                crop_seg_logit = model(inputs[:, :, y1:y2, x1:x2], exit_threshold=exit_threshold).logits
            crop_seg_logit = F.interpolate(
                crop_seg_logit, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False
            )
            preds += F.pad(crop_seg_logit, (x1, preds.shape[3] - x2, y1, preds.shape[2] - y2))
            count_mat[:, :, y1:y2, x1:x2] += 1
    seg_logits = preds / count_mat
    seg_logits = F.interpolate(seg_logits, size=(height, width), mode="bilinear", align_corners=False)
    return seg_logits[0].argmax(dim=0)


SLIDE_CASES = {
    "wide": ((45, 170), (128, 32)),  # (height, width), mmseg scale (long, short): one row of 6 windows
    "tall": ((170, 45), (128, 32)),  # one column of 6 windows
    "grid": ((60, 100), (160, 40)),  # short side 40 > crop 32: 2 x 3 windows
}


@pytest.mark.parametrize("case", sorted(SLIDE_CASES))
def test_slide_mode_equals_mmseg_slide_inference_also_through_the_pipeline(
    case, model_tester, exit_thresholds, tmp_path
):
    (height, width), (long_edge, short_edge) = SLIDE_CASES[case]
    model = model_tester(num_labels=5, initializer_range=0.5).create_model()
    size = {"shortest_edge": short_edge, "longest_edge": long_edge}
    processor = DToPImageProcessor(do_split_image=True, size=size, **SLIDE)
    image = Image.fromarray(
        np.asarray(random_image(height // 5 + 1, width // 5 + 1, seed=3).resize((width, height), Image.BICUBIC))
    )  # smooth content: regions of several classes
    inputs = processor(images=image, return_tensors="pt")
    thresholds = exit_thresholds(model, inputs["pixel_values"])
    reference = mmseg_slide_inference(model, image, (long_edge, short_edge), 32, 21, thresholds)
    assert len(reference.unique()) >= 2

    with torch.no_grad():
        outputs = model(**inputs, exit_threshold=thresholds)
    assert (outputs.exit_stage < 2).any()  # the windows pruned
    segmentation = processor.post_process_semantic_segmentation(outputs, target_sizes=[(height, width)])[0]
    assert segmentation.shape == (height, width)
    assert (segmentation == reference).float().mean() >= 0.995, float((segmentation == reference).float().mean())

    model.config.exit_threshold = thresholds  # the pipeline runs the saved model's thresholds
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    segments = pipeline("image-segmentation", model=str(tmp_path), trust_remote_code=True)(image)
    from_pipeline = torch.full((height, width), -1)
    label2id = {label: index for index, label in model.config.id2label.items()}
    for segment in segments:
        from_pipeline[torch.from_numpy(np.array(segment["mask"]) > 0)] = label2id[segment["label"]]
    assert (from_pipeline == reference).float().mean() >= 0.995


def test_padded_inputs_crop_the_padding_before_resizing():
    # A 30 x 26 input with 4-pixel patches: the model pads it to 32 x 28 (an 8 x 7 grid); the post-processing
    # upsamples the grid to 32 x 28, crops the 30 x 26 the input covered, and only then resizes to the target.
    processor = DToPImageProcessor(size={"height": 30, "width": 26})
    logits = torch.randn(1, 4, 8, 7)
    target = (61, 47)
    outputs = {"logits": logits}
    result = processor.post_process_semantic_segmentation(outputs, [target], return_segmentation_scores=True)[0]
    unpadded = F.interpolate(logits, size=(32, 28), mode="bilinear", align_corners=False)[..., :30, :26]
    expected = F.interpolate(unpadded, size=target, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(result.segmentation_scores, expected, rtol=0, atol=0)
    assert torch.equal(result.segmentation, expected.argmax(dim=0))
    stretched = F.interpolate(logits, size=(30, 26), mode="bilinear", align_corners=False)
    stretched = F.interpolate(stretched, size=target, mode="bilinear", align_corners=False)
    assert not torch.allclose(stretched[0], expected)  # the old behaviour differs
    # An explicit patch size gives the same; exit maps crop the same way (nearest).
    explicit = DToPImageProcessor(size={"height": 30, "width": 26}, patch_size=4)
    assert torch.equal(explicit.post_process_semantic_segmentation(outputs, [target])[0], result.segmentation)
    exit_stage = torch.randint(0, 3, (1, 8, 7))
    exit_map = processor.post_process_exit_map({"exit_stage": exit_stage}, [(30, 26)])[0]
    tokens = exit_stage[0].repeat_interleave(4, dim=0).repeat_interleave(4, dim=1)[:30, :26]
    assert torch.equal(exit_map, tokens)


def test_padded_window_with_a_real_model(model_tester):
    # Slide mode with an image whose short side (13 px) is below the crop: one 13 x 32 window, padded by the model.
    model = model_tester().create_model()
    processor = DToPImageProcessor(do_split_image=True, **SLIDE)
    inputs = processor(images=random_image(20, 200), return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (13, 32)
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.logits.shape[-2:] == (4, 8)  # ceil(13 / 4) x 8 tokens
    scores = processor.post_process_semantic_segmentation(outputs, [(20, 200)], return_segmentation_scores=True)
    window_scores = F.interpolate(outputs.logits, size=(16, 32), mode="bilinear", align_corners=False)[..., :13, :]
    offsets = [offset.tolist() for offset in inputs["patch_offsets"]]
    merged = torch.zeros(5, 13, 128)
    counts = torch.zeros(13, 128)
    for window, (_, top, bottom, left, right) in zip(window_scores, offsets, strict=True):
        merged[:, top:bottom, left:right] += window
        counts[top:bottom, left:right] += 1
    expected = F.interpolate((merged / counts)[None], size=(20, 200), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(scores[0].segmentation_scores, expected, rtol=0, atol=1e-6)


def peaked_logits(num_labels: int, grid: tuple[int, int], seed: int) -> torch.Tensor:
    """`(1, num_labels, *grid)` scores as real models give them: a few classes dominate, in smooth regions."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, num_labels, grid[0] // 4, grid[1] // 4, generator=generator) * 3
    logits = F.interpolate(coarse, size=grid, mode="bilinear", align_corners=False)
    return logits + torch.randn(1, num_labels, 1, 1, generator=generator) * 4


def test_the_class_map_is_argmax_over_the_classes_that_can_win():
    processor = DToPImageProcessor(size={"height": 128, "width": 128})
    for seed, (num_labels, target) in enumerate([(150, (300, 200)), (150, (61, 47)), (20, (128, 128))]):
        for scores in (
            peaked_logits(num_labels, (32, 32), seed),
            peaked_logits(num_labels, (32, 32), seed).softmax(1),
        ):
            winner = int(scores[0, :, 0, 0].argmax())
            twin = num_labels - 1 if winner != num_labels - 1 else 0
            scores[:, twin] = scores[:, winner]  # two classes always tied
            kept = classes_that_can_win(scores[0])
            assert min(winner, twin) in kept.tolist() and len(kept) < num_labels  # a handful of classes can win
            result = processor.post_process_semantic_segmentation(
                {"logits": scores}, [target], return_segmentation_scores=True
            )[0]
            assert torch.equal(result.segmentation, result.segmentation_scores.argmax(dim=0))
            # Every class outside the kept ones is below the maximum everywhere.
            dropped = torch.ones(num_labels, dtype=torch.bool)
            dropped[kept] = False
            assert (result.segmentation_scores[dropped] < result.segmentation_scores.amax(dim=0)).all()
    # Equal maxima (here: everywhere) go to the first class, as with argmax; bfloat16 keeps a wider margin.
    scores = torch.zeros(6, 50, 70)
    assert torch.equal(argmax_among(scores, torch.arange(6)), torch.zeros(50, 70, dtype=torch.long))
    scores = peaked_logits(150, (32, 32), 5).softmax(1).bfloat16()
    result = processor.post_process_semantic_segmentation(
        {"logits": scores}, [(300, 200)], return_segmentation_scores=True
    )[0]
    assert torch.equal(result.segmentation, result.segmentation_scores.argmax(dim=0))
