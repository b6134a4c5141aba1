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
"""Tests of the DToP model against the official behaviour: unpruned baseline, batch invariance,
token exit, the final map, any image size, attention implementations, input errors, loss, outputs, save/load,
Auto classes and the image-segmentation pipeline."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation, pipeline

from dtop_hf import DToPForSemanticSegmentation, DToPImageProcessor, DToPModel
from dtop_hf.pruning import ActiveTokens, pack_tokens, select_exiting_tokens


# Batch invariance: an image alone and inside a batch run the same maths on differently laid out tensors (other
# padded lengths, other matmul shapes), so results agree to float rounding, not bit for bit. Measured max
# difference: ~2e-8 on these tiny models (0 with eager); exit decisions must agree exactly.
BATCH_ATOL = 1e-5
# sdpa vs eager: different softmax kernels, same tolerance. Measured max difference: ~3e-8.
ATTENTION_ATOL = 1e-5


def base_model(model: torch.nn.Module) -> DToPModel:
    return model.dtop if isinstance(model, DToPForSemanticSegmentation) else model


@torch.no_grad()
def run(model: torch.nn.Module, pixel_values: torch.Tensor, **kwargs):
    return model(pixel_values, **kwargs)


@torch.no_grad()
def dense_stage_logits(model: torch.nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Hand-run unpruned reference: embeddings, every layer and every head on all tokens, no exit logic at all.

    Returns each head's scores `(batch, num_labels, h, w)`: ATM presence x sigmoid(mask logits), FCN logits.
    """
    dtop, config = base_model(model), model.config
    embeddings, grid_size = dtop.embeddings(pixel_values)  # (batch, tokens, dim)
    batch_size, num_tokens = embeddings.shape[0], grid_size[0] * grid_size[1]
    packing = pack_tokens(torch.ones(batch_size, num_tokens, dtype=torch.bool))
    hidden_states = packing.from_grid(embeddings)  # (batch * tokens, dim)
    stage_logits = []
    for layer_index, layer in enumerate(dtop.layers):
        hidden_states, _ = layer(hidden_states, packing, None)
        if layer_index in config.out_indices:
            head = dtop.heads[config.out_indices.index(layer_index)]
            head_output = head(hidden_states, packing)
            values = packing.to_grid(head_output.mask_logits).transpose(1, 2)  # (batch, num_labels, tokens)
            values = head.class_scores(head_output.class_logits, values)  # ATM: presence x sigmoid; FCN: as is
            stage_logits.append(values.reshape(batch_size, -1, *grid_size))
    return stage_logits


def confidence_and_class(model: torch.nn.Module, stage_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(batch, tokens)` confidence and predicted class as the exit rule sees them."""
    confidence, predicted_class = model.class_probabilities(stage_scores).flatten(2).max(dim=1)
    return confidence, predicted_class


def assert_outputs_close(actual, expected, atol: float) -> None:
    """Exit decisions equal, every float output within `atol`."""
    assert torch.equal(actual.exit_stage, expected.exit_stage)
    assert torch.equal(actual.tokens_per_layer, expected.tokens_per_layer)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=atol)
    for field in ("stage_logits", "stage_mask_logits", "stage_class_logits"):
        if getattr(expected, field) is None:
            assert getattr(actual, field) is None
            continue
        for actual_value, expected_value in zip(getattr(actual, field), getattr(expected, field), strict=True):
            torch.testing.assert_close(actual_value, expected_value, rtol=0, atol=atol)


def pruned_setup(model_tester, exit_thresholds, varied_images, head_type, batch_size=3, **overrides):
    model = model_tester(head_type=head_type, **overrides).create_model()
    pixel_values = varied_images(batch_size)
    return model, pixel_values, exit_thresholds(model, pixel_values)


def variant_setup(model_tester, exit_thresholds, varied_images, head_type, variant, attn_implementation):
    """Model, 3 images that prune differently and their thresholds. The variant `cls_token_odd_size` keeps the class
    token through the layers and feeds 30x21 images (padded to a 8x6 grid)."""
    overrides = {"use_cls_token": True} if variant == "cls_token_odd_size" else {}
    model = model_tester(head_type=head_type, **overrides).create_model()
    pixel_values = varied_images(3)
    if variant == "cls_token_odd_size":
        pixel_values = pixel_values[..., :30, :21]
    thresholds = exit_thresholds(model, pixel_values)
    model.set_attn_implementation(attn_implementation)
    return model, pixel_values, thresholds


# --- 1. threshold 1.0 is the unpruned model -------------------------------------------------------------------


def test_threshold_one_is_the_dense_forward_bit_for_bit(model_tester, exit_thresholds, varied_images, head_type):
    model, pixel_values, thresholds = pruned_setup(model_tester, exit_thresholds, varied_images, head_type)
    num_tokens = 64
    reference = dense_stage_logits(model, pixel_values)
    unpruned = run(model, pixel_values, exit_threshold=1.0)
    assert torch.equal(unpruned.logits, reference[-1])
    for stage_output, stage_reference in zip(unpruned.stage_logits, reference, strict=True):
        assert torch.equal(stage_output, stage_reference)
    assert (unpruned.tokens_per_layer == num_tokens).all()
    assert (unpruned.exit_stage == len(model.config.out_indices) - 1).all()

    # The same through the config, and with a threshold no confidence exceeds (the exit rule runs, nobody exits).
    model.config.exit_threshold = 1.0
    assert torch.equal(run(model, pixel_values).logits, reference[-1])
    model.config.exit_threshold = 0.9
    above_every_confidence = run(model, pixel_values, exit_threshold=0.999)
    assert torch.equal(above_every_confidence.logits, reference[-1])
    assert (above_every_confidence.tokens_per_layer == num_tokens).all()

    # Control: the thresholds of the other tests really prune and really change the result.
    pruned = run(model, pixel_values, exit_threshold=thresholds)
    assert (pruned.tokens_per_layer[:, -1] < num_tokens).all()
    assert not torch.equal(pruned.logits, reference[-1])


def test_keep_top_k_covering_every_token_is_the_dense_forward(model_tester):
    # Threshold 0.01: every token is a candidate; keep_top_k = 64 >= tokens per class: every candidate stays.
    model = model_tester(keep_top_k=64).create_model()
    pixel_values = torch.randn(2, 3, 32, 32)
    outputs = run(model, pixel_values, exit_threshold=0.01)
    assert (outputs.tokens_per_layer == 64).all()
    assert torch.equal(outputs.logits, dense_stage_logits(model, pixel_values)[-1])


# --- 2. batch invariance --------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", ["plain", "cls_token_odd_size"])
def test_image_result_does_not_depend_on_its_batch(
    model_tester, exit_thresholds, varied_images, head_type, attn_implementation, variant
):
    model, pixel_values, thresholds = variant_setup(
        model_tester, exit_thresholds, varied_images, head_type, variant, attn_implementation
    )
    batch_outputs = run(model, pixel_values, exit_threshold=thresholds)
    # The images prune differently: the batch needs padding and key masks.
    assert len(set(batch_outputs.tokens_per_layer[:, -1].tolist())) > 1
    for image in range(len(pixel_values)):
        alone = run(model, pixel_values[image : image + 1], exit_threshold=thresholds)
        in_batch = {
            name: (
                value[image : image + 1]
                if torch.is_tensor(value)
                else tuple(item[image : image + 1] for item in value)
            )
            for name, value in batch_outputs.items()
        }
        assert_outputs_close(type(alone)(**in_batch), alone, BATCH_ATOL)
    # Other batch compositions: reversed order, and a batch-mate of another kind (a constant image).
    reversed_outputs = run(model, pixel_values.flip(0), exit_threshold=thresholds)
    torch.testing.assert_close(reversed_outputs.logits.flip(0), batch_outputs.logits, rtol=0, atol=BATCH_ATOL)
    assert torch.equal(reversed_outputs.exit_stage.flip(0), batch_outputs.exit_stage)
    with_constant = run(
        model, torch.cat([pixel_values[:1], torch.zeros_like(pixel_values[:1])]), exit_threshold=thresholds
    )
    torch.testing.assert_close(with_constant.logits[:1], batch_outputs.logits[:1], rtol=0, atol=BATCH_ATOL)
    assert torch.equal(with_constant.exit_stage[:1], batch_outputs.exit_stage[:1])


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", ["plain", "cls_token_odd_size"])
def test_exported_graphs_padded_exits_give_threshold_modes_results(
    model_tester, exit_thresholds, varied_images, head_type, attn_implementation, variant, monkeypatch
):
    """What an exported graph runs in threshold mode, run eagerly: every image of the batch padded to the token count
    of the image with the most tokens left (`ActiveTokens.after_exit_padded`), each image's result threshold
    mode's."""
    model, pixel_values, thresholds = variant_setup(
        model_tester, exit_thresholds, varied_images, head_type, variant, attn_implementation
    )
    packed = run(model, pixel_values, exit_threshold=thresholds)
    assert len(set(packed.tokens_per_layer[:, -1].tolist())) > 1  # the images prune differently: padding is needed
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    padded_exits, after_exit_padded = [], ActiveTokens.after_exit_padded
    monkeypatch.setattr(
        ActiveTokens, "after_exit_padded", lambda *args: padded_exits.append(args[2]) or after_exit_padded(*args)
    )
    padded = run(model, pixel_values, exit_threshold=thresholds)
    assert padded_exits == [0, 1, 2]  # the padded path ran after every head (nothing exits at the decode head)
    assert_outputs_close(padded, packed, BATCH_ATOL)


# --- 3. exited tokens really leave ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_cls_token", [False, True])
def test_tokens_per_layer_drop_by_the_exited_tokens(
    model_tester, exit_thresholds, varied_images, head_type, use_cls_token
):
    model, pixel_values, thresholds = pruned_setup(
        model_tester, exit_thresholds, varied_images, head_type, use_cls_token=use_cls_token
    )
    out_indices = model.config.out_indices
    rows_seen = {}

    def count_rows(layer_index):
        def hook(module, args):
            hidden_states = args[0]
            # Packed layout (total, dim): one row per active token of the batch.
            rows_seen[layer_index] = (
                hidden_states.shape[0] if hidden_states.ndim == 2 else hidden_states.shape[:2].numel()
            )

        return hook

    handles = [
        layer.register_forward_pre_hook(count_rows(index)) for index, layer in enumerate(base_model(model).layers)
    ]
    outputs = run(model, pixel_values, exit_threshold=thresholds)
    for handle in handles:
        handle.remove()

    exit_stage = outputs.exit_stage.flatten(1)  # (batch, tokens)
    assert (exit_stage < len(out_indices) - 1).any(dim=1).all(), "every image must prune for this test"
    for layer_index in range(model.config.num_hidden_layers):
        heads_before = sum(index < layer_index for index in out_indices)
        expected = (exit_stage >= heads_before).sum(dim=1) + int(use_cls_token)  # class token never exits
        assert outputs.tokens_per_layer[:, layer_index].tolist() == expected.tolist(), layer_index
        # The layer really processed only those rows (packed sequence, no masked-out rows).
        assert rows_seen[layer_index] == int(expected.sum()), layer_index
    # Both auxiliary heads made tokens exit.
    assert {0, 1} <= set(exit_stage.unique().tolist())


def perturbed_run(model, pixel_values, thresholds, rows_to_perturb, frozen_head_output):
    """Run with noise added to `rows_to_perturb` `(batch, tokens)` of the first head's layer output, the first head
    returning `frozen_head_output` so that its predictions and exit decisions cannot change."""
    dtop, first_head_layer = base_model(model), model.config.out_indices[0]

    def add_noise(module, args, output):
        hidden_states = output[0] if isinstance(output, tuple) else output
        # No token has exited before the first head: the packed rows are the whole grid, image after image.
        noise = torch.randn(hidden_states.shape, generator=torch.Generator().manual_seed(1)) * 3.0
        noise = noise * rows_to_perturb.reshape(-1, 1).to(noise.dtype)
        hidden_states = hidden_states + noise.reshape(hidden_states.shape)
        return (hidden_states, *output[1:]) if isinstance(output, tuple) else hidden_states

    handles = [
        dtop.layers[first_head_layer].register_forward_hook(add_noise),
        dtop.heads[0].register_forward_hook(lambda module, args, output: frozen_head_output),
    ]
    try:
        return run(model, pixel_values, exit_threshold=thresholds)
    finally:
        for handle in handles:
            handle.remove()


def test_exited_tokens_take_no_part_in_later_layers(model_tester, exit_thresholds, varied_images, head_type):
    model, pixel_values, thresholds = pruned_setup(
        model_tester, exit_thresholds, varied_images, head_type, batch_size=2
    )
    recorded = {}
    first_head = base_model(model).heads[0]
    handle = first_head.register_forward_hook(lambda module, args, output: recorded.setdefault("head", output))
    reference = run(model, pixel_values, exit_threshold=thresholds)
    handle.remove()
    exited_at_first_head = reference.exit_stage.flatten(1) == 0  # (batch, tokens)
    still_active = ~exited_at_first_head
    assert exited_at_first_head.any(dim=1).all()

    # Change the features the exited tokens carry out of the first stage: nothing may change anywhere.
    perturbed = perturbed_run(model, pixel_values, thresholds, exited_at_first_head, recorded["head"])
    assert torch.equal(perturbed.exit_stage, reference.exit_stage)
    assert torch.equal(perturbed.logits, reference.logits)
    for stage in range(1, len(model.config.out_indices)):
        assert torch.equal(perturbed.stage_mask_logits[stage], reference.stage_mask_logits[stage])

    # Control: the same perturbation on one token per image that stays active does reach the other active tokens
    # (through attention), so the unchanged result above is not an accident of the hook.
    one_active = torch.zeros_like(still_active)
    one_active[torch.arange(len(still_active)), still_active.long().argmax(dim=1)] = True
    control = perturbed_run(model, pixel_values, thresholds, one_active, recorded["head"])
    others = (still_active & ~one_active) & (control.exit_stage.flatten(1) == reference.exit_stage.flatten(1))
    last_mask_logits = (control.stage_mask_logits[-1] - reference.stage_mask_logits[-1]).flatten(2).abs().amax(dim=1)
    assert (last_mask_logits[others] > 1e-4).any()


# --- 5. the final map -----------------------------------------------------------------------------------------


def test_exit_decisions_follow_the_exit_rule(model_tester, exit_thresholds, varied_images, head_type):
    model, pixel_values, thresholds = pruned_setup(model_tester, exit_thresholds, varied_images, head_type)
    outputs = run(model, pixel_values, exit_threshold=thresholds)
    exit_stage = outputs.exit_stage.flatten(1)
    active_mask = torch.ones_like(exit_stage, dtype=torch.bool)
    for stage, threshold in enumerate(thresholds):
        confidence, predicted_class = confidence_and_class(model, outputs.stage_logits[stage])
        expected_exit = select_exiting_tokens(
            confidence, predicted_class, active_mask, threshold, model.config.keep_top_k
        )
        assert torch.equal(exit_stage == stage, expected_exit), stage
        active_mask = active_mask & ~expected_exit


def test_atm_final_map_is_final_presence_times_sigmoid_canvas(model_tester, exit_thresholds, varied_images):
    model, pixel_values, thresholds = pruned_setup(model_tester, exit_thresholds, varied_images, "atm")
    outputs = run(model, pixel_values, exit_threshold=thresholds)
    exit_stage = outputs.exit_stage  # (batch, h, w)
    num_stages = len(model.config.out_indices)
    for stage in range(num_stages):
        presence = outputs.stage_class_logits[stage].softmax(dim=-1)[..., 0]  # (batch, num_labels)
        expected = presence[:, :, None, None] * outputs.stage_mask_logits[stage].sigmoid()
        torch.testing.assert_close(outputs.stage_logits[stage], expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(outputs.logits, outputs.stage_logits[-1], rtol=0, atol=0)
    # The canvas: a token keeps the mask logits of the head it exited at, through every later head.
    for exit_at in range(num_stages - 1):
        exited = (exit_stage == exit_at)[:, None].expand_as(outputs.stage_mask_logits[0])
        for later in range(exit_at + 1, num_stages):
            assert torch.equal(outputs.stage_mask_logits[later][exited], outputs.stage_mask_logits[exit_at][exited])
    # Tokens a head saw got new mask logits from it.
    for stage in range(1, num_stages):
        seen = (exit_stage >= stage)[:, None].expand_as(outputs.stage_mask_logits[0])
        assert (outputs.stage_mask_logits[stage][seen] != outputs.stage_mask_logits[stage - 1][seen]).all()
    # The final presence factor applies to exited tokens too (official code: not their exit head's presence).
    exited_first = exit_stage == 0
    final_presence = outputs.stage_class_logits[-1].softmax(dim=-1)[..., 0]
    first_presence = outputs.stage_class_logits[0].softmax(dim=-1)[..., 0]
    assert not torch.allclose(final_presence, first_presence)
    expected_exited = (final_presence[:, :, None, None] * outputs.stage_mask_logits[0].sigmoid()).permute(0, 2, 3, 1)
    torch.testing.assert_close(
        outputs.logits.permute(0, 2, 3, 1)[exited_first], expected_exited[exited_first], rtol=0, atol=1e-7
    )


def test_fcn_exited_tokens_keep_their_exit_stage_scores(model_tester, exit_thresholds, varied_images):
    model, pixel_values, thresholds = pruned_setup(model_tester, exit_thresholds, varied_images, "fcn")
    outputs = run(model, pixel_values, exit_threshold=thresholds)
    assert outputs.stage_class_logits is None
    logits = outputs.logits.permute(0, 2, 3, 1)  # (batch, h, w, num_labels)
    for stage in range(len(model.config.out_indices)):
        at_stage = outputs.exit_stage == stage
        assert at_stage.any()
        assert torch.equal(logits[at_stage], outputs.stage_logits[stage].permute(0, 2, 3, 1)[at_stage])
    # ... and the later heads' values for them are different (the earlier scores were kept, not recomputed).
    exited_first = outputs.exit_stage == 0
    dense = run(model, pixel_values, exit_threshold=1.0)
    assert not torch.allclose(logits[exited_first], dense.logits.permute(0, 2, 3, 1)[exited_first])


def test_override_thresholds_per_head(model_tester, exit_thresholds, varied_images, head_type):
    model, pixel_values, (first, second) = pruned_setup(model_tester, exit_thresholds, varied_images, head_type)
    last = len(model.config.out_indices) - 1
    only_first = run(model, pixel_values, exit_threshold=[first, 1.0]).exit_stage
    assert set(only_first.unique().tolist()) == {0, last}
    only_second = run(model, pixel_values, exit_threshold=(1.0, second)).exit_stage
    assert set(only_second.unique().tolist()) == {1, last}
    # A per-call override beats the config, whatever the config says.
    model.config.exit_threshold = (first, second)
    both = run(model, pixel_values).exit_stage
    assert torch.equal(run(model, pixel_values, exit_threshold=[first, 1.0]).exit_stage, only_first)
    assert set(both.unique().tolist()) == {0, 1, last}
    with pytest.raises(ValueError, match="one `exit_threshold` value per auxiliary head"):
        run(model, pixel_values, exit_threshold=[0.5])
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        run(model, pixel_values, exit_threshold=1.5)


def test_every_token_exiting_at_the_first_head(model_tester, head_type):
    # keep_top_k = 0 and a tiny threshold: every token exits at the first head, later layers get nothing.
    model = model_tester(head_type=head_type, keep_top_k=0).create_model()
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    outputs = run(model, pixel_values, exit_threshold=1e-6)
    assert (outputs.exit_stage == 0).all()
    assert outputs.tokens_per_layer[:, 2:].eq(0).all() and outputs.tokens_per_layer[:, :2].eq(64).all()
    assert torch.isfinite(outputs.logits).all()
    assert torch.equal(outputs.stage_mask_logits[-1], outputs.stage_mask_logits[0])
    model.train()
    model.config.prune_during_training = True
    outputs = model(pixel_values, labels=labels, exit_threshold=1e-6)
    assert (outputs.exit_stage == 0).all()
    loss = outputs.loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --- 6. any image size ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(30, 21), (32, 16), (13, 40)])
def test_non_square_and_non_divisible_sizes_are_padded(model_tester, head_type, height, width):
    model = model_tester(head_type=head_type).create_model()
    pixel_values = torch.randn(2, 3, height, width)
    grid = (-(-height // 4), -(-width // 4))
    outputs = run(model, pixel_values, exit_threshold=1.0)
    assert outputs.logits.shape == (2, 5, *grid) and outputs.exit_stage.shape == (2, *grid)
    # Padding is bottom/right with zeros (the normalised mean colour): same as padding by hand.
    padded = F.pad(pixel_values, (0, grid[1] * 4 - width, 0, grid[0] * 4 - height))
    torch.testing.assert_close(run(model, padded, exit_threshold=1.0).logits, outputs.logits, rtol=0, atol=1e-6)


def test_loss_with_labels_of_a_non_divisible_input_size(model_tester, exit_thresholds, varied_images, head_type):
    model = model_tester(head_type=head_type).create_model()
    pixel_values = varied_images(2)[..., :30, :21]
    thresholds = exit_thresholds(model, pixel_values)
    labels = torch.randint(0, 5, (2, 30, 21), generator=torch.Generator().manual_seed(3))
    labels[:, :4] = 255
    loss = run(model, pixel_values, labels=labels, exit_threshold=thresholds).loss
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    # The padded pixels carry no label: padding the input and marking the padding "ignore" gives the same loss.
    padded_pixels = F.pad(pixel_values, (0, 3, 0, 2))
    padded_labels = F.pad(labels, (0, 3, 0, 2), value=255)
    padded_loss = run(model, padded_pixels, labels=padded_labels, exit_threshold=thresholds).loss
    torch.testing.assert_close(loss, padded_loss, rtol=1e-5, atol=1e-6)


# --- 7. sdpa vs eager, no loop over images ---------------------------------------------------------------------


@pytest.mark.parametrize("pruned", [False, True])
def test_sdpa_and_eager_agree(model_tester, exit_thresholds, varied_images, head_type, pruned):
    sdpa_model, pixel_values, thresholds = pruned_setup(model_tester, exit_thresholds, varied_images, head_type)
    assert sdpa_model.config._attn_implementation == "sdpa"
    eager_model = copy.deepcopy(sdpa_model)
    eager_model.set_attn_implementation("eager")
    exit_threshold = thresholds if pruned else 1.0
    sdpa_outputs = run(sdpa_model, pixel_values, exit_threshold=exit_threshold)
    eager_outputs = run(eager_model, pixel_values, exit_threshold=exit_threshold)
    assert_outputs_close(eager_outputs, sdpa_outputs, ATTENTION_ATOL)
    assert pruned == bool((sdpa_outputs.tokens_per_layer < 64).any())


@pytest.mark.parametrize("batch_size", [1, 4])
def test_each_layer_and_head_runs_once_per_forward_whatever_the_batch(
    model_tester, exit_thresholds, varied_images, head_type, batch_size
):
    model, pixel_values, thresholds = pruned_setup(
        model_tester, exit_thresholds, varied_images, head_type, batch_size=batch_size
    )
    dtop = base_model(model)
    modules = [*dtop.layers, *dtop.heads, *(layer.attention for layer in dtop.layers)]
    calls = []  # one entry per forward call of any of these modules
    handles = [module.register_forward_pre_hook(lambda module, args: calls.append(module)) for module in modules]
    outputs = run(model, pixel_values, exit_threshold=thresholds)
    for handle in handles:
        handle.remove()
    assert (outputs.exit_stage == 0).any()  # pruning did happen
    # Every layer, attention and head ran exactly once for the whole batch: no Python loop over the images.
    assert len(calls) == len(modules) and all(sum(call is module for call in calls) == 1 for module in modules)


# --- 8. bad inputs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (torch.randn(2, 1, 32, 32), r"has 1 channels but the model expects 3"),
        (torch.randn(2, 4, 32, 32), r"has 4 channels but the model expects 3"),
        (torch.randn(0, 3, 32, 32), r"empty batch"),
        (torch.randn(3, 32, 32), r"must have shape \(batch_size, num_channels, height, width\)"),
        (torch.randn(1, 3, 3, 32), r"at least one patch \(4x4\).*3x32"),
        (torch.randn(1, 3, 32, 2), r"at least one patch \(4x4\)"),
        (torch.full((1, 3, 32, 32), float("nan")), r"NaN or infinite"),
        # One NaN among finite values: the second image's last value.
        (torch.randn(6144).index_fill(0, torch.tensor([6143]), float("nan")).view(2, 3, 32, 32), r"NaN or infinite"),
        (torch.randn(1, 3, 32, 32).index_fill(3, torch.tensor([5]), float("inf")), r"NaN or infinite"),
        (torch.randn(1, 3, 32, 32).index_fill(2, torch.tensor([7]), float("-inf")), r"NaN or infinite"),
    ],
    ids=["grey", "rgba", "empty", "no-batch-dim", "too-short", "too-narrow", "nan", "one-nan", "inf", "-inf"],
)
def test_bad_pixel_values_raise_clear_errors(model_tester, pixel_values, message):
    model = model_tester().create_model()
    with pytest.raises(ValueError, match=message):
        run(model, pixel_values)
    with pytest.raises(ValueError, match=message):
        run(base_model(model), pixel_values)


@pytest.mark.parametrize("bad_value", [5, 17, -1, 254])
def test_labels_out_of_range_raise(model_tester, head_type, bad_value):
    model = model_tester(head_type=head_type).create_model()
    labels = torch.randint(0, 5, (2, 32, 32))
    labels[1, 3, 4] = bad_value
    with pytest.raises(ValueError, match=rf"class ids in \[0, 5\) or the ignore index 255, got \[{bad_value}\]"):
        run(model, torch.randn(2, 3, 32, 32), labels=labels)


def test_ignore_index_labels_are_accepted(model_tester, head_type):
    model = model_tester(head_type=head_type).create_model()
    labels = torch.full((2, 32, 32), 255)
    loss = run(model, torch.randn(2, 3, 32, 32), labels=labels).loss
    assert torch.isfinite(loss)


def test_float_labels_and_bad_label_shapes_raise(model_tester, head_type):
    model = model_tester(head_type=head_type).create_model()
    pixel_values = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="integer class ids, got dtype torch.float32"):
        run(model, pixel_values, labels=torch.full((2, 32, 32), 4.7))
    with pytest.raises(ValueError, match=r"shape \(batch_size, height, width\), got \(2, 32\)"):
        run(model, pixel_values, labels=torch.zeros(2, 32, dtype=torch.long))


def test_labels_with_a_channel_axis_give_the_same_loss(model_tester, head_type):
    model = model_tester(head_type=head_type).create_model().eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 5, (2, 32, 32), generator=torch.Generator().manual_seed(1))
    loss = run(model, pixel_values, labels=labels).loss
    assert torch.equal(run(model, pixel_values, labels=labels[:, None]).loss, loss)


def test_mistyped_keyword_arguments_are_refused(model_tester):
    model = model_tester().create_model()
    with pytest.raises(TypeError, match="exit_treshold"):
        model(torch.randn(1, 3, 32, 32), exit_treshold=0.1)
    with pytest.raises(TypeError, match="labels"):
        base_model(model)(torch.randn(1, 3, 32, 32), labels=torch.zeros(1, 32, 32, dtype=torch.long))


# --- loss -----------------------------------------------------------------------------------------------------


def test_loss_is_the_weighted_sum_of_the_head_losses(model_tester, exit_thresholds, varied_images, head_type):
    model, pixel_values, thresholds = pruned_setup(model_tester, exit_thresholds, varied_images, head_type)
    labels = torch.randint(0, 5, (3, 32, 32), generator=torch.Generator().manual_seed(0))
    labels[:, :, :8] = 2  # some classes present in some images only, a large class everywhere
    total = run(model, pixel_values, labels=labels, exit_threshold=thresholds).loss
    head_losses = []
    for stage in range(3):
        model.config.stage_loss_weights = tuple(float(index == stage) for index in range(3))
        head_losses.append(run(model, pixel_values, labels=labels, exit_threshold=thresholds).loss)
    assert all(loss > 0 for loss in head_losses)
    torch.testing.assert_close(total, sum(head_losses), rtol=1e-6, atol=0)
    model.config.stage_loss_weights = (2.0, 0.0, 0.5)
    weighted = run(model, pixel_values, labels=labels, exit_threshold=thresholds).loss
    torch.testing.assert_close(weighted, 2 * head_losses[0] + 0.5 * head_losses[2], rtol=1e-6, atol=0)


def test_ignored_pixels_are_ignored_unless_counted_as_negatives(model_tester):
    model = model_tester().create_model()
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 5, (2, 32, 32), generator=torch.Generator().manual_seed(0))
    ignored = labels.clone()
    ignored[:, 16:] = 255
    loss_ignored = run(model, pixel_values, labels=ignored).loss
    loss_full = run(model, pixel_values, labels=labels).loss
    model.config.ignore_pixels_as_negatives = True
    loss_negatives = run(model, pixel_values, labels=ignored).loss
    assert torch.isfinite(loss_ignored) and torch.isfinite(loss_negatives)
    assert not torch.allclose(loss_ignored, loss_negatives)
    # Without ignored pixels the switch changes nothing.
    torch.testing.assert_close(run(model, pixel_values, labels=labels).loss, loss_full, rtol=1e-6, atol=0)


# --- training -------------------------------------------------------------------------------------------------


def test_every_trainable_parameter_gets_a_gradient_with_pruning_on(
    model_tester, exit_thresholds, varied_images, head_type
):
    model, pixel_values, thresholds = pruned_setup(model_tester, exit_thresholds, varied_images, head_type)
    model.train()
    model.config.prune_during_training = True
    labels = torch.randint(0, 5, (3, 32, 32), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    outputs = model(pixel_values, labels=labels, exit_threshold=thresholds)
    assert (outputs.exit_stage == 0).any() and (outputs.exit_stage == 1).any()  # pruning happened in training
    outputs.loss.backward()
    without_gradient = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert not without_gradient
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


# --- outputs --------------------------------------------------------------------------------------------------


def test_hidden_states_and_attentions(model_tester, exit_thresholds, varied_images, head_type):
    model, pixel_values, thresholds = pruned_setup(model_tester, exit_thresholds, varied_images, head_type)
    model.set_attn_implementation("eager")
    config = model.config
    outputs = run(model, pixel_values, exit_threshold=thresholds, output_hidden_states=True, output_attentions=True)
    assert len(outputs.hidden_states) == config.num_hidden_layers + 1
    assert len(outputs.attentions) == config.num_hidden_layers
    assert all(state.shape == (3, 64, config.hidden_size) for state in outputs.hidden_states)
    assert all(weights.shape == (3, config.num_attention_heads, 64, 64) for weights in outputs.attentions)
    embeddings, _ = base_model(model).embeddings(pixel_values)
    assert torch.equal(outputs.hidden_states[0], embeddings)

    exit_stage = outputs.exit_stage.flatten(1)
    for layer_index in range(config.num_hidden_layers):
        heads_before = sum(index < layer_index for index in config.out_indices)
        active = exit_stage >= heads_before  # (batch, tokens) tokens entering this layer
        layer_output = outputs.hidden_states[layer_index + 1]
        assert (layer_output[~active] == 0).all() and (layer_output[active].abs().sum(dim=-1) > 0).all()
        weights = outputs.attentions[layer_index]  # (batch, heads, queries, keys)
        key_active = active[:, None, None, :].expand_as(weights)
        query_active = active[:, None, :, None].expand_as(weights)
        # Exited tokens are neither queries nor keys; active queries spread all their attention over active keys.
        assert (weights[~key_active] == 0).all() and (weights[~query_active] == 0).all()
        row_sums = weights.sum(dim=-1)[active[:, None, :].expand(-1, config.num_attention_heads, -1)]
        torch.testing.assert_close(row_sums, torch.ones_like(row_sums))

    # Also through the config flags, as transformers models do.
    config.output_hidden_states = True
    flagged = run(model, pixel_values, exit_threshold=thresholds)
    assert len(flagged.hidden_states) == config.num_hidden_layers + 1 and flagged.attentions is None
    config.output_hidden_states = False
    assert run(model, pixel_values).hidden_states is None


@pytest.mark.parametrize("batch", ["one image", "two equal images"])
def test_attentions_are_on_the_token_grid_when_the_packing_is_uniform(
    model_tester, exit_thresholds, varied_images, head_type, batch
):
    # Batch 1, or images with equal token counts: the packed layout is uniform although tokens have exited, and
    # the weights must still come back as (batch, heads, tokens, tokens), not (batch, heads, active, active).
    model = model_tester(head_type=head_type).create_model()
    model.set_attn_implementation("eager")
    pixel_values = varied_images(1)
    thresholds = exit_thresholds(model, pixel_values)
    if batch == "two equal images":
        pixel_values = pixel_values.repeat(2, 1, 1, 1)
    outputs = run(model, pixel_values, exit_threshold=thresholds, output_attentions=True)
    batch_size, num_heads = len(pixel_values), model.config.num_attention_heads
    assert (outputs.tokens_per_layer[:, -1] < 64).all()  # tokens exited
    assert all(weights.shape == (batch_size, num_heads, 64, 64) for weights in outputs.attentions)
    exit_stage = outputs.exit_stage.flatten(1)
    last_weights = outputs.attentions[-1]  # (batch, heads, queries, keys)
    exited = exit_stage < len(model.config.out_indices) - 1  # (batch, tokens) not in the last layer
    assert (last_weights.transpose(1, 2)[exited] == 0).all() and (last_weights.permute(0, 3, 1, 2)[exited] == 0).all()
    row_sums = last_weights.sum(dim=-1).transpose(1, 2)[~exited]  # (active tokens, heads)
    torch.testing.assert_close(row_sums, torch.ones_like(row_sums))
    # The same weights as inside a batch whose images prune differently (padded layout).
    mixed_batch = torch.cat([pixel_values[:1], varied_images(3)[1:]])
    mixed = run(model, mixed_batch, exit_threshold=thresholds, output_attentions=True)
    for alone, in_batch in zip(outputs.attentions, mixed.attentions, strict=True):
        torch.testing.assert_close(alone[:1], in_batch[:1], rtol=0, atol=BATCH_ATOL)


def test_return_dict_false_gives_the_same_values_as_a_tuple(model_tester, exit_thresholds, varied_images, head_type):
    model, pixel_values, thresholds = pruned_setup(model_tester, exit_thresholds, varied_images, head_type)
    labels = torch.randint(0, 5, (3, 32, 32))
    for kwargs in ({}, {"labels": labels}):
        as_dict = run(model, pixel_values, exit_threshold=thresholds, **kwargs)
        as_tuple = run(model, pixel_values, exit_threshold=thresholds, return_dict=False, **kwargs)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict)
        # Fields that are None are dropped: loss first when labels are given, else logits first.
        assert torch.equal(as_tuple[0], as_dict.loss if kwargs else as_dict.logits)
        for tuple_value, dict_value in zip(as_tuple, as_dict.to_tuple(), strict=True):
            if torch.is_tensor(dict_value):
                assert torch.equal(tuple_value, dict_value)
            else:
                assert all(torch.equal(a, b) for a, b in zip(tuple_value, dict_value, strict=True))


def test_output_dtypes_and_shapes(model_tester, head_type):
    model = model_tester(head_type=head_type).create_model()
    outputs = run(model, torch.randn(2, 3, 32, 32))
    assert outputs.loss is None and outputs.logits.dtype == torch.float32
    assert outputs.exit_stage.dtype == torch.int64 and outputs.tokens_per_layer.dtype == torch.int64
    assert outputs.tokens_per_layer.shape == (2, 4)
    assert len(outputs.stage_logits) == len(outputs.stage_mask_logits) == 3
    assert all(value.shape == (2, 5, 8, 8) for value in (*outputs.stage_logits, *outputs.stage_mask_logits))
    if head_type == "atm":
        assert all(value.shape == (2, 5, 2) for value in outputs.stage_class_logits)
        assert ((outputs.logits >= 0) & (outputs.logits <= 1)).all()  # probabilities


def test_base_model_gives_the_same_outputs(model_tester, exit_thresholds, varied_images, head_type, tmp_path):
    model, pixel_values, thresholds = pruned_setup(model_tester, exit_thresholds, varied_images, head_type)
    segmenter_outputs = run(model, pixel_values, exit_threshold=thresholds)
    model.save_pretrained(tmp_path)
    base = DToPModel.from_pretrained(tmp_path).eval()
    base_outputs = run(base, pixel_values, exit_threshold=thresholds)
    assert not hasattr(base_outputs, "loss") or base_outputs.get("loss") is None
    assert_outputs_close(base_outputs, segmenter_outputs, atol=0)


# --- save / load, Auto classes, pipeline ---------------------------------------------------------------------


def save_model_and_processor(model, folder, image_size: int = 32) -> DToPImageProcessor:
    processor = DToPImageProcessor(size={"height": image_size, "width": image_size})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return processor


def test_save_and_load_round_trip(model_tester, exit_thresholds, varied_images, head_type, tmp_path):
    model, pixel_values, thresholds = pruned_setup(model_tester, exit_thresholds, varied_images, head_type)
    model.config.exit_threshold = thresholds
    expected = run(model, pixel_values)
    save_model_and_processor(model, tmp_path)
    reloaded = DToPForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert reloaded.config.exit_threshold == thresholds and reloaded.config.head_type == head_type
    assert_outputs_close(run(reloaded, pixel_values), expected, atol=0)
    original_state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert original_state.keys() == reloaded_state.keys()
    assert all(torch.equal(original_state[key], reloaded_state[key]) for key in original_state)


def test_auto_classes_resolve_to_dtop(model_tester, tmp_path):
    model = model_tester().create_model()
    save_model_and_processor(model, tmp_path)
    pixel_values = torch.randn(1, 3, 32, 32)
    auto_model = AutoModel.from_pretrained(tmp_path)
    auto_segmenter = AutoModelForSemanticSegmentation.from_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(auto_model) is DToPModel and type(auto_segmenter) is DToPForSemanticSegmentation
    assert type(processor) is DToPImageProcessor and processor.size == {"height": 32, "width": 32}
    expected = run(model, pixel_values).logits
    assert torch.equal(run(auto_model.eval(), pixel_values).logits, expected)
    assert torch.equal(run(auto_segmenter.eval(), pixel_values).logits, expected)


def test_image_segmentation_pipeline(model_tester, tmp_path):
    model = model_tester(id2label={index: f"class_{index}" for index in range(5)}).create_model()
    # Random heads give one class the highest presence everywhere; equal presence (zero class embedding) lets the
    # mask logits decide, so that the map holds several classes.
    with torch.no_grad():
        model.dtop.heads[-1].class_embed.weight.zero_()
        model.dtop.heads[-1].class_embed.bias.zero_()
    processor = save_model_and_processor(model, tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))

    segmenter = pipeline("image-segmentation", model=str(tmp_path), trust_remote_code=True)
    results = segmenter(image)

    inputs = processor(images=image, return_tensors="pt")
    expected_map = processor.post_process_semantic_segmentation(
        run(model, inputs["pixel_values"]), target_sizes=[(45, 70)]
    )[0]
    present = sorted(expected_map.unique().tolist())
    assert len(present) >= 2
    assert [result["label"] for result in results] == [f"class_{index}" for index in present]
    for result, class_index in zip(results, present, strict=True):
        mask = np.array(result["mask"])
        assert result["mask"].size == (70, 45) and mask.shape == (45, 70)
        assert np.array_equal(mask > 0, (expected_map == class_index).numpy())
