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
"""Tests for the analytic FLOPs counter: against torch's FlopCounterMode on tiny models; the paper's ViT-B figure."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dtop_hf import DToPConfig, DToPForSemanticSegmentation, DToPImageProcessor
from dtop_hf.toolkit.evaluation.flops import (
    capacity_flops_ratio,
    capacity_token_counts,
    count_flops,
    count_flops_from_outputs,
    flops_from_capacities,
    flops_from_token_counts,
    sum_windows_per_image,
    tokens_seen_per_stage,
)


def counting_model(model_tester, **settings) -> DToPForSemanticSegmentation:
    """A tiny model ready for FlopCounterMode."""
    # Frozen: under no_grad a view of a parameter still requires grad, which trips FlopCounterMode's module tracker.
    model = model_tester(**settings).create_model().requires_grad_(False)
    # On CPU FlopCounterMode counts nothing for sdpa attention (a torch bug): count the eager matmuls.
    model.set_attn_implementation("eager")
    return model


def counted_macs(
    model: torch.nn.Module, pixel_values: torch.Tensor, exit_threshold=None, **exit_rule
) -> tuple[int, object]:
    """MACs that FlopCounterMode sees (it counts 2 FLOPs per MAC) and the model's output."""
    counter = FlopCounterMode(display=False)
    with counter:
        outputs = model(pixel_values, exit_threshold=exit_threshold, **exit_rule)
    return counter.get_total_flops() // 2, outputs


@pytest.mark.parametrize("use_cls_token", [False, True])
def test_matches_flop_counter_at_batch_one(model_tester, exit_thresholds, head_type, use_cls_token):
    model = counting_model(model_tester, head_type=head_type, use_cls_token=use_cls_token)
    pixel_values = torch.randn(1, 3, 32, 24)  # non-square: 8 x 6 grid
    pruned_thresholds = exit_thresholds(model, pixel_values)
    per_threshold_total = []
    with torch.no_grad():
        for exit_threshold in (1.0, pruned_thresholds):
            macs, outputs = counted_macs(model, pixel_values, exit_threshold)
            flops = count_flops_from_outputs(model.config, outputs)
            assert flops.total.shape == (1,) and flops.total.dtype == torch.float64
            assert flops.total.item() * 1e9 == pytest.approx(macs, rel=1e-12, abs=0.5)
            per_threshold_total.append(flops.total.item())
    # The pruned run really pruned (otherwise this test would not cover pruning) and costs less.
    assert outputs.tokens_per_layer[0, -1] < outputs.tokens_per_layer[0, 0]
    assert per_threshold_total[1] < per_threshold_total[0]


def test_parts_add_up_and_count_flops_runs_the_model(model_tester):
    model = counting_model(model_tester)
    pixel_values = torch.randn(2, 3, 32, 32)
    flops = count_flops(model, pixel_values, exit_threshold=1.0)
    backbone = flops.patch_embedding + flops.layers.sum(dim=1)
    torch.testing.assert_close(flops.total, backbone + flops.heads.sum(dim=1))
    torch.testing.assert_close(flops.backbone_and_final_head, backbone + flops.heads[:, -1])
    # Unpruned: both images cost the same, and every head costs the same.
    torch.testing.assert_close(flops.total[0], flops.total[1])
    torch.testing.assert_close(flops.heads[:, 0], flops.heads[:, -1])
    # The base model gives the same count.
    base_flops = count_flops(model.dtop, pixel_values, exit_threshold=1.0)
    torch.testing.assert_close(base_flops.total, flops.total)


def padding_macs(config: DToPConfig, outputs) -> int:
    """MACs the padded per-image layout adds for a batch whose images kept different numbers of tokens."""
    tokens_per_layer = outputs.tokens_per_layer
    waste = 2 * config.hidden_size * (tokens_per_layer.amax(dim=0) ** 2 - tokens_per_layer**2).sum()
    tokens_per_stage = tokens_seen_per_stage(outputs.exit_stage, len(config.out_indices))
    per_padded_slot = config.head_num_layers * (
        2 * config.head_hidden_size**2 + 2 * config.num_labels * config.head_hidden_size
    )
    waste += per_padded_slot * (tokens_per_stage.amax(dim=0) - tokens_per_stage).sum()
    return int(waste)


def test_batch_counts_per_image_and_explains_padding(model_tester, exit_thresholds, varied_images):
    model = counting_model(model_tester)
    first, second = varied_images(batch_size=2).split(1)
    thresholds = exit_thresholds(model, torch.cat([first, second]))
    with torch.no_grad():
        batch_macs, batch_outputs = counted_macs(model, torch.cat([first, second]), thresholds)
        batch_flops = count_flops_from_outputs(model.config, batch_outputs)
        alone = [count_flops(model, image, thresholds).total for image in (first, second)]
    # Per image, the count is the image's own, whatever its batch-mate pruned.
    torch.testing.assert_close(batch_flops.total, torch.cat(alone))
    # The images pruned differently, so the executed MACs exceed the per-image sum by exactly the padding.
    assert not torch.equal(batch_outputs.tokens_per_layer[0], batch_outputs.tokens_per_layer[1])
    waste = padding_macs(model.config, batch_outputs)
    assert waste > 0
    assert batch_flops.total.sum().item() * 1e9 + waste == pytest.approx(batch_macs, rel=1e-12)


@pytest.mark.parametrize("use_cls_token", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_capacity_flops_from_capacities_alone_match_flop_counter(
    model_tester, varied_images, head_type, use_cls_token, batch_size
):
    model = counting_model(model_tester, head_type=head_type, use_cls_token=use_cls_token)
    pixel_values = varied_images(batch_size)[..., :30, :]  # 30 x 32 pixels: padded to an 8 x 8 grid
    capacities = (0.6, 0.3)
    predicted = flops_from_capacities(model.config, (30, 32), capacities)  # no model run
    assert predicted.total.shape == (1,)
    with torch.no_grad():
        macs, outputs = counted_macs(model, pixel_values, exit_capacity=capacities)
    # Every image keeps the same tokens, so no padding: the batch executes exactly batch_size x the prediction.
    assert predicted.total.item() * 1e9 * batch_size == pytest.approx(macs, rel=1e-12)
    # ... and the count from the outputs agrees image by image.
    from_outputs = count_flops_from_outputs(model.config, outputs)
    torch.testing.assert_close(from_outputs.total, predicted.total.expand(batch_size), rtol=0, atol=0)
    tokens_per_layer, tokens_per_stage = capacity_token_counts(model.config, (30, 32), capacities)
    assert torch.equal(outputs.tokens_per_layer, tokens_per_layer.expand(batch_size, -1))
    assert tokens_per_stage.tolist() == [[64, 39, 20]]  # ceil(0.6 * 64), ceil(0.3 * 64)
    # R from the capacities alone: the unpruned run over this one.
    with torch.no_grad():
        unpruned_macs, _ = counted_macs(model, pixel_values, exit_capacity=1.0)
    assert capacity_flops_ratio(model.config, (30, 32), capacities) == pytest.approx(unpruned_macs / macs, rel=1e-12)


def test_capacity_flops_of_vit_b_16_at_512():
    config = DToPConfig(num_labels=150)
    unpruned = flops_from_capacities(config, (512, 512), 1.0)
    reference = flops_from_token_counts(config, torch.full((1, 12), 1024), torch.full((1, 3), 1024))
    torch.testing.assert_close(unpruned.total, reference.total)
    # Capacities that keep 75% then 55% of the tokens: layers 6-7 see 768 tokens, layers 8-11 see 564.
    tokens_per_layer, tokens_per_stage = capacity_token_counts(config, (512, 512), (0.75, 0.55))
    assert tokens_per_layer.tolist() == [[1024] * 6 + [768] * 2 + [564] * 4]
    assert tokens_per_stage.tolist() == [[1024, 768, 564]]
    ratio = capacity_flops_ratio(config, (512, 512), (0.75, 0.55), figure="backbone_and_final_head")
    assert 1.2 < ratio < capacity_flops_ratio(config, (512, 512), (0.5, 0.3)) < 1.6
    with pytest.raises(ValueError, match="must not increase"):
        flops_from_capacities(config, (512, 512), (0.5, 0.6))


def test_vit_b_16_at_512_matches_the_paper():
    config = DToPConfig(num_labels=150)  # ViT-B/16, official head dims
    num_tokens = (512 // 16) ** 2
    flops = flops_from_token_counts(
        config,
        torch.full((1, config.num_hidden_layers), num_tokens),
        torch.full((1, len(config.out_indices)), num_tokens),
    )
    # The paper's 109.9; an analytic count gives ~109.4 (backbone 106.9 + one head 2.5).
    assert 109.4 <= flops.backbone_and_final_head.item() <= 109.9
    assert (flops.patch_embedding + flops.layers.sum(dim=1)).item() == pytest.approx(106.9, abs=0.05)
    assert flops.heads[0, -1].item() == pytest.approx(2.5, abs=0.1)
    # The two auxiliary heads add ~5 more.
    assert flops.total.item() - flops.backbone_and_final_head.item() == pytest.approx(5.0, abs=0.2)


def test_fewer_tokens_cost_less_on_vit_b():
    config = DToPConfig(num_labels=150)
    full = torch.full((1, 12), 1024)
    # Tokens leave after layers 5 and 7, as with DToP: layers 6-7 see 600, layers 8-11 see 300.
    pruned = torch.tensor([[1024] * 6 + [600] * 2 + [300] * 4])
    full_flops = flops_from_token_counts(config, full, torch.tensor([[1024, 1024, 1024]]))
    pruned_flops = flops_from_token_counts(config, pruned, torch.tensor([[1024, 600, 300]]))
    assert pruned_flops.backbone_and_final_head.item() < full_flops.backbone_and_final_head.item() - 30
    torch.testing.assert_close(pruned_flops.layers[:, :6], full_flops.layers[:, :6])


def split_inputs(processor: DToPImageProcessor, pixel_values: torch.Tensor) -> dict:
    """The slide-mode windows of every image of `pixel_values`, with their `patch_offsets`."""
    windows, offsets = [], []
    for index, image in enumerate(pixel_values):
        image_windows, image_offsets = processor.split_image(image, index)
        windows += image_windows
        offsets += [torch.tensor(offset) for offset in image_offsets]
    return {"pixel_values": torch.stack(windows), "patch_offsets": offsets}


def test_split_image_gflops_are_the_exact_sum_of_its_windows(model_tester, exit_thresholds, varied_images):
    model = counting_model(model_tester, keep_top_k=1)
    processor = DToPImageProcessor(crop_size={"height": 16, "width": 16}, stride={"height": 8, "width": 8})
    pixel_values = varied_images(batch_size=1)[..., :24, :]  # 2 x 3 windows of 4 x 4 tokens
    inputs = split_inputs(processor, pixel_values)
    assert len(inputs["patch_offsets"]) == 6
    threshold = exit_thresholds(model, inputs["pixel_values"])
    with torch.no_grad():
        for exit_threshold in (1.0, threshold):
            counter = FlopCounterMode(display=False)
            with counter:
                outputs = model(**inputs, exit_threshold=exit_threshold)
            flops = count_flops_from_outputs(model.config, outputs)
            assert flops.total.shape == (1,)
            # The sum of the windows' own counts, each from its tokens_per_layer (attention is quadratic per window).
            per_window = flops_from_token_counts(
                model.config, outputs.tokens_per_layer, tokens_seen_per_stage(outputs.exit_stage, 3)
            )
            assert flops.total.item() == pytest.approx(per_window.total.sum().item(), rel=1e-12)
            assert flops.backbone_and_final_head.item() == pytest.approx(
                per_window.backbone_and_final_head.sum().item(), rel=1e-12
            )
            # Windows of one image all have the same size: no padding, so the executed MACs are that sum exactly.
            if exit_threshold == 1.0:
                assert flops.total.item() * 1e9 == pytest.approx(counter.get_total_flops() // 2, rel=1e-12)
            else:
                assert outputs.tokens_per_layer[:, -1].sum() < outputs.tokens_per_layer[:, 0].sum()
                alone = [count_flops(model, window[None], exit_threshold).total for window in inputs["pixel_values"]]
                assert flops.total.item() == pytest.approx(torch.cat(alone).sum().item(), rel=1e-12)


def test_split_image_flops_are_per_image(model_tester, exit_thresholds, varied_images):
    model = counting_model(model_tester)
    processor = DToPImageProcessor(crop_size={"height": 32, "width": 16}, stride={"height": 32, "width": 16})
    pixel_values = varied_images(batch_size=2)  # 2 windows per image, all 4 in one forward
    inputs = split_inputs(processor, pixel_values)
    threshold = exit_thresholds(model, inputs["pixel_values"])
    with torch.no_grad():
        batch_flops = count_flops_from_outputs(model.config, model(**inputs, exit_threshold=threshold))
        alone = [
            count_flops_from_outputs(
                model.config, model(**split_inputs(processor, image[None]), exit_threshold=threshold)
            ).total
            for image in pixel_values
        ]
    torch.testing.assert_close(batch_flops.total, torch.cat(alone))
    assert batch_flops.total[0] != batch_flops.total[1]
    # Unpruned: every window as if no token had left.
    with torch.no_grad():
        unpruned = count_flops_from_outputs(model.config, model(**inputs, exit_threshold=threshold), unpruned=True)
        reference = count_flops_from_outputs(model.config, model(**inputs, exit_threshold=1.0))
    torch.testing.assert_close(unpruned.total, reference.total)


def test_bad_shapes_raise():
    config = DToPConfig(num_labels=150)
    with pytest.raises(ValueError, match="tokens_per_layer"):
        flops_from_token_counts(config, torch.ones(1, 11), torch.ones(1, 3))
    with pytest.raises(ValueError, match="tokens_per_stage"):
        flops_from_token_counts(config, torch.ones(1, 12), torch.ones(1, 2))
    with pytest.raises(ValueError, match="patch_offsets"):
        sum_windows_per_image(torch.ones(3, 12), [torch.tensor([0, 0, 16, 0, 16])] * 2)
    with pytest.raises(ValueError, match="tokens_per_layer"):
        count_flops_from_outputs(config, {"exit_stage": torch.zeros(1, 2, 2, dtype=torch.long)})


def test_tokens_seen_per_stage():
    exit_stage = torch.tensor([[[0, 2], [1, 2]], [[2, 2], [2, 2]]])
    assert tokens_seen_per_stage(exit_stage, 3).tolist() == [[4, 3, 2], [4, 4, 4]]
