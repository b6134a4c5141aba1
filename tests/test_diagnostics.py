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

"""Tests of the exit diagnostics (depth profile, exit precision, boundary shares) against hand-computed cases."""

import math

import pytest
import torch

from dtop_hf import DToPConfig, DToPForSemanticSegmentation, DToPImageProcessor
from dtop_hf.toolkit.evaluation.diagnostics import (
    EXIT_COUNT_NAMES,
    ExitDiagnostics,
    boundary_tokens,
    diagnose_batch,
    exit_counts,
    exit_labels,
    format_diagnostics_markdown,
    token_labels,
)
from dtop_hf.toolkit.evaluation.metrics import StreamingMeanIoU


IGNORE = 255

# 4 x 4 labels, 2 x 2 patches -> a 2 x 2 token grid. Worked out by hand:
#   top-left  {0, 0, 0, 1}: label 0, two classes      -> boundary
#   top-right {1, 1, 1, 1}: label 1, one class, but its left neighbour is 0 -> boundary
#   bottom-left {2, 2, 2, 0}: label 2, two classes    -> boundary
#   bottom-right: all unlabelled -> IGNORE; an unlabelled neighbour never makes a boundary -> not one
LABELS = torch.tensor(
    [
        [
            [0, 0, 1, 1],
            [0, 1, 1, 1],
            [2, 2, IGNORE, IGNORE],
            [2, 0, IGNORE, IGNORE],
        ]
    ]
)


def test_token_labels_take_the_patch_majority_and_ignore_empty_patches():
    assert token_labels(LABELS, patch_size=2, num_labels=3).tolist() == [[[0, 1], [2, IGNORE]]]


def test_token_labels_break_ties_to_the_smaller_class_and_pad_like_the_model():
    # 3 x 3 -> padded to 4 x 4 with IGNORE: top-left {1, 0, 0, 1} is a tie -> 0; the others see only class 2.
    labels = torch.tensor([[[1, 0, 2], [0, 1, 2], [2, 2, 2]]])
    assert token_labels(labels, patch_size=2, num_labels=3).tolist() == [[[0, 2], [2, 2]]]
    # top-left mixed; top-right and bottom-left pure but next to the 0 token; bottom-right pure among 2s.
    assert boundary_tokens(labels, patch_size=2, num_labels=3).tolist() == [[[True, True], [True, False]]]


def test_boundary_tokens_mixed_patches_and_differing_neighbours():
    assert boundary_tokens(LABELS, patch_size=2, num_labels=3).tolist() == [[[True, True], [True, False]]]


def test_a_region_edge_on_the_patch_grid_is_a_boundary():
    # Two pure halves: no patch is mixed, yet the two middle columns of tokens meet a different class.
    labels = torch.tensor([[[0] * 4 + [1] * 4] * 2])
    assert boundary_tokens(labels, patch_size=2, num_labels=2).tolist() == [[[False, True, True, False]]]


def test_out_of_range_labels_are_rejected():
    with pytest.raises(ValueError):
        token_labels(torch.tensor([[[0, 5]]]), patch_size=1, num_labels=3)


def one_hot_logits(classes: list[list[int]], num_labels: int) -> torch.Tensor:
    """`(1, num_labels, h, w)` scores whose argmax is `classes`."""
    return torch.nn.functional.one_hot(torch.tensor([classes]), num_labels).permute(0, 3, 1, 2).float()


# One image, 2 x 2 tokens, 3 heads (2 auxiliary + decode). Token (row, col):
#   (0, 0) exits at head 0 with 0; unpruned final 0; truth 0; inside a region
#   (0, 1) exits at head 0 with 1; unpruned final 0; truth 1; boundary
#   (1, 0) exits at head 1 with 2; unpruned final 2; unlabelled; boundary
#   (1, 1) stays to the decode head, 2; unpruned final 1; truth 1; boundary
EXIT_STAGE = torch.tensor([[[0, 0], [1, 2]]])
EXIT_LABEL = torch.tensor([[[0, 1], [2, 2]]])
REFERENCE = torch.tensor([[[0, 0], [2, 1]]])
TRUTH = torch.tensor([[[0, 1], [IGNORE, 1]]])
BOUNDARY = torch.tensor([[[False, True], [True, True]]])


def test_exit_labels_are_the_labels_of_the_final_map():
    logits = one_hot_logits([[0, 1], [2, 2]], 3)
    assert exit_labels(logits).tolist() == EXIT_LABEL.tolist()


def test_fcn_exit_labels_are_the_exit_heads_own_labels():
    # With FCN heads the final map holds the exit head's scores, so the label a token keeps is that head's.
    torch.manual_seed(0)
    config = DToPConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=4, num_labels=4, out_indices=[1, 2, 3], head_hidden_size=16, head_num_attention_heads=2,
        head_num_layers=1, head_type="fcn",
    )  # fmt: skip
    model = DToPForSemanticSegmentation(config).eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 32, 32), exit_threshold=1e-6)
    exited = outputs.exit_stage == 0
    assert exited.any() and not exited.all()
    first_head = outputs.stage_logits[0].argmax(dim=1)
    assert torch.equal(exit_labels(outputs.logits)[exited], first_head[exited])


def test_exit_counts_by_hand():
    counts = exit_counts(EXIT_STAGE, EXIT_LABEL, REFERENCE, TRUTH, BOUNDARY, num_stages=3)
    assert list(counts) == list(EXIT_COUNT_NAMES)
    expected = {
        "exited": [2, 1, 1],
        "agree": [1, 1, 0],
        "labelled": [2, 0, 1],
        "correct": [2, 0, 0],
        "reference_correct": [1, 0, 1],
        "boundary": [1, 1, 1],
    }
    assert {name: value.tolist() for name, value in counts.items()} == expected


def assert_lists_close(actual: list[float], expected: list[float]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert (math.isnan(a) and math.isnan(e)) or a == pytest.approx(e), (actual, expected)


def test_accumulator_by_hand():
    diagnostics = ExitDiagnostics(num_labels=3, num_stages=3)
    diagnostics.update_exits(EXIT_STAGE, EXIT_LABEL, REFERENCE, TRUTH, BOUNDARY)
    # Depth profile on pixels: labels [[0, 1], [1, 1]]. Head 0 predicts [[0, 0], [1, 1]]: class 0 I=1 U=2,
    # class 1 I=2 U=3 -> mIoU (1/2 + 2/3) / 2; heads 1 and 2 are exact; class 2 is absent (NaN, left out).
    labels = torch.tensor([[[0, 1], [1, 1]]])
    diagnostics.update_depth_profile([torch.tensor([[[0, 0], [1, 1]]]), labels, labels], labels)
    result = diagnostics.compute()
    assert_lists_close(result["depth_mean_iou"], [(1 / 2 + 2 / 3) / 2, 1.0, 1.0])
    assert_lists_close(result["exit_share"], [0.5, 0.25, 0.25])
    assert_lists_close(result["exit_agreement"], [0.5, 1.0, 0.0])
    assert_lists_close(result["exit_accuracy"], [1.0, float("nan"), 0.0])
    assert_lists_close(result["reference_accuracy"], [0.5, float("nan"), 1.0])
    assert_lists_close(result["exit_boundary_share"], [0.5, 1.0, 1.0])
    assert result["boundary_share"] == pytest.approx(0.75)
    assert result["num_tokens"] == 4
    table = format_diagnostics_markdown(result, ["head 1", "head 2", "decode head"])
    assert "| head 1 | 58.3 | 50.0 | 50.0 | 100.0 | 50.0 | 50.0 |" in table
    assert "| head 2 | 100.0 | 25.0 | 100.0 | - | - | 100.0 |" in table


def test_merge_equals_one_accumulator_fed_both_batches():
    whole, first, second = (ExitDiagnostics(num_labels=3, num_stages=3) for _ in range(3))
    flipped = [tensor.flip(-1) for tensor in (EXIT_STAGE, EXIT_LABEL, REFERENCE, TRUTH, BOUNDARY)]
    for accumulator, batches in ((whole, [None, flipped]), (first, [None]), (second, [flipped])):
        for batch in batches:
            accumulator.update_exits(*(batch or (EXIT_STAGE, EXIT_LABEL, REFERENCE, TRUTH, BOUNDARY)))
    first.merge(second)
    assert {name: value.tolist() for name, value in first.counts.items()} == {
        name: value.tolist() for name, value in whole.counts.items()
    }
    assert (first.num_tokens, first.num_boundary_tokens) == (whole.num_tokens, whole.num_boundary_tokens) == (8, 6)


@pytest.fixture(scope="module")
def tiny_model() -> DToPForSemanticSegmentation:
    torch.manual_seed(0)
    config = DToPConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=4, num_labels=4, out_indices=[1, 2, 3], head_hidden_size=16, head_num_attention_heads=2,
        head_num_layers=1,
    )  # fmt: skip
    return DToPForSemanticSegmentation(config).eval()


def test_diagnose_batch_decode_row_is_the_evaluation_miou(tiny_model):
    torch.manual_seed(1)
    pixel_values = torch.randn(3, 3, 32, 32)
    labels = torch.randint(0, 4, (3, 32, 32))
    labels[:, :4, :4] = IGNORE
    processor = DToPImageProcessor()
    diagnostics = ExitDiagnostics(num_labels=4, num_stages=3)
    diagnose_batch(tiny_model, pixel_values, labels, diagnostics, exit_threshold=1.0, image_processor=processor)
    result = diagnostics.compute()

    with torch.no_grad():
        outputs = tiny_model(pixel_values, exit_threshold=1.0)
    metric = StreamingMeanIoU(4)
    for prediction, label in zip(processor.post_process_semantic_segmentation(outputs, [(32, 32)] * 3), labels):
        metric.update(prediction, label)
    assert result["depth_mean_iou"][-1] == pytest.approx(metric.compute()["mean_iou"])
    # Unpruned: every token stays to the decode head and keeps the unpruned label.
    assert_lists_close(result["exit_share"], [0.0, 0.0, 1.0])
    assert result["exit_agreement"][-1] == 1.0
    assert result["exit_accuracy"][-1] == pytest.approx(result["reference_accuracy"][-1])
    assert result["num_tokens"] == 3 * 8 * 8


def test_diagnose_batch_counts_early_exits_and_resizes_labels(tiny_model):
    torch.manual_seed(2)
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 4, (2, 16, 16))  # half the input size: resized to it for the token statistics
    diagnostics = ExitDiagnostics(num_labels=4, num_stages=3)
    # A random ATM model's scores are low: a tiny threshold lets all but the top-k kept tokens exit at head 1.
    diagnose_batch(tiny_model, pixel_values, labels, diagnostics, exit_threshold=1e-6)
    result = diagnostics.compute()
    assert result["exit_share"][0] > 0.5
    assert sum(result["exit_share"]) == pytest.approx(1.0)
    assert 0.0 <= result["exit_agreement"][0] <= 1.0
