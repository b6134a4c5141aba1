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
"""Tests of capacity mode: the config's capacities, the selection rule against a plain per-image loop (alone and
inside the model, ATM and FCN), exits as in threshold mode, and one graph under `torch.compile(fullgraph=True)`."""

import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from dtop_hf import DToPConfig
from dtop_hf.pruning import num_tokens_kept, select_kept_tokens


def capacity_config(**overrides) -> DToPConfig:
    """A tiny config with two auxiliary heads."""
    settings = {
        "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64,
        "image_size": 32, "patch_size": 4, "out_indices": (1, 2, 3), "head_hidden_size": 16,
        "head_num_attention_heads": 2, "num_labels": 5,
    }  # fmt: skip
    return DToPConfig(**{**settings, **overrides})


# --- the config --------------------------------------------------------------------------------------------------


def test_capacities_per_head_and_exit_rule():
    config = capacity_config(exit_mode="capacity", exit_capacity=[0.5, 0.25])
    assert config.exit_capacity == (0.5, 0.25)
    assert config.exit_capacities_per_head() == (0.5, 0.25, 1.0)
    assert config.exit_capacities_per_head(0.4) == (0.4, 0.4, 1.0)
    assert config.exit_rule() == ("capacity", (0.5, 0.25, 1.0))
    # A per-call knob says the mode; the default mode stays threshold.
    assert config.exit_rule(exit_threshold=0.8) == ("threshold", (0.8, 0.8, 1.0))
    default = capacity_config()
    assert default.exit_mode == "threshold" and default.exit_capacity is None
    assert default.exit_rule() == ("threshold", (0.9, 0.9, 1.0))
    assert default.exit_rule(exit_capacity="0.6,0.3") == ("capacity", (0.6, 0.3, 1.0))
    assert default.exit_rule("capacity", exit_capacity=0.7) == ("capacity", (0.7, 0.7, 1.0))


@pytest.mark.parametrize(
    "capacity, message",
    [
        ([0.5], r"one `exit_capacity` value per auxiliary head \(2\), got \[0.5\]"),
        ([0.5, 0.6], r"must not increase from one auxiliary head to the next .* got \[0.5, 0.6\]"),
        (0.0, r"`exit_capacity` must lie in \(0, 1\]"),
        ([0.5, 1.5], r"`exit_capacity` must lie in \(0, 1\]"),
    ],
)
def test_bad_capacities_raise_in_config_and_forward_alike(capacity, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        capacity_config(exit_mode="capacity", exit_capacity=capacity)
    # The forward's per-call argument goes through the same check.
    with pytest.raises(ValueError, match=message):
        capacity_config().exit_rule("capacity", exit_capacity=capacity)


def test_bad_modes_and_mixed_knobs_raise():
    with pytest.raises(ValueError, match="number or one per auxiliary head"):
        capacity_config().exit_rule(exit_capacity="half")
    with pytest.raises(StrictDataclassClassValidationError, match="Capacity mode needs `exit_capacity`"):
        capacity_config(exit_mode="capacity")
    with pytest.raises(StrictDataclassClassValidationError, match="`exit_mode` must be 'threshold' or 'capacity'"):
        capacity_config(exit_mode="budget")
    config = capacity_config()
    with pytest.raises(ValueError, match="Got both `exit_threshold` and `exit_capacity`"):
        config.exit_rule(exit_threshold=0.9, exit_capacity=0.5)
    with pytest.raises(ValueError, match="`exit_capacity` applies in capacity mode only"):
        config.exit_rule("threshold", exit_capacity=0.5)
    with pytest.raises(ValueError, match="`exit_threshold` applies in threshold mode only"):
        config.exit_rule("capacity", exit_threshold=0.9, exit_capacity=0.5)


def test_capacity_config_round_trips(tmp_path):
    config = capacity_config(exit_mode="capacity", exit_capacity=(0.75, 0.5))
    config.save_pretrained(tmp_path)
    loaded = DToPConfig.from_pretrained(tmp_path)
    assert loaded.exit_mode == "capacity" and loaded.exit_capacity == (0.75, 0.5)


def test_tokens_kept_is_the_ceiling_without_float_noise():
    assert num_tokens_kept(0.5, 64) == 32 and num_tokens_kept(0.3, 1024) == 308  # ceil(307.2)
    assert num_tokens_kept(0.7, 10) == 7  # 0.7 * 10 is 7.000000000000001 in floating point
    assert num_tokens_kept(1.0, 64) == 64 and num_tokens_kept(1e-6, 64) == 1


# --- the selection rule ------------------------------------------------------------------------------------------


def reference_kept_tokens(confidence, predicted_class, active_mask, num_kept, keep_top_k) -> list[list[int]]:
    """Capacity mode's rule as plain per-image loops: per class the `keep_top_k` most confident active tokens are
    context (ties: the earlier token); context fills the places first, rank by rank (every class's best, then every
    class's second, ..., within a rank the more confident, then the earlier token); the other places go to the least
    confident remaining active tokens, ties to the earlier token. Returns each image's kept tokens, sorted."""
    kept = []
    for image in range(confidence.shape[0]):
        active = [token for token in range(confidence.shape[1]) if active_mask[image, token]]
        score = {token: confidence[image, token].item() for token in active}
        rank = {}
        for label in {int(predicted_class[image, token]) for token in active}:
            of_label = sorted(
                (token for token in active if int(predicted_class[image, token]) == label),
                key=lambda token: (-score[token], token),
            )
            rank.update({token: position for position, token in enumerate(of_label)})
        context = sorted(
            (token for token in active if rank[token] < keep_top_k),
            key=lambda token: (rank[token], -score[token], token),
        )
        others = sorted(
            (token for token in active if rank[token] >= keep_top_k), key=lambda token: (score[token], token)
        )
        kept.append(sorted((context + others)[:num_kept]))
    return kept


def select(confidence, predicted_class, num_kept, keep_top_k, active=None) -> list[list[int]]:
    confidence = torch.tensor(confidence)
    predicted_class = torch.tensor(predicted_class)
    active = torch.ones_like(confidence, dtype=torch.bool) if active is None else torch.tensor(active)
    kept_index = select_kept_tokens(confidence, predicted_class, active, num_kept, keep_top_k)
    assert kept_index.dtype == torch.long and kept_index.shape == (confidence.shape[0], num_kept)
    return kept_index.tolist()


class TestSelectKeptTokens:
    def test_least_confident_go_on_ties_by_lower_index(self):
        confidence = [[0.9, 0.2, 0.5, 0.2, 0.8, 0.5]]
        assert select(confidence, [[0] * 6], num_kept=3, keep_top_k=0) == [[1, 2, 3]]  # 0.2, 0.2, then the first 0.5

    def test_context_tokens_go_on_first(self):
        confidence = [[0.9, 0.2, 0.5, 0.3, 0.8, 0.95]]
        predicted_class = [[0, 1, 1, 1, 0, 2]]
        # Context (k=1): class 0's 0.9 (token 0), class 1's 0.5 (token 2), class 2's 0.95 (token 5); then the least
        # confident other token, 0.2 (token 1).
        assert select(confidence, predicted_class, num_kept=4, keep_top_k=1) == [[0, 1, 2, 5]]

    def test_more_context_than_places_fills_rank_by_rank(self):
        confidence = [[0.9, 0.85, 0.6, 0.55, 0.7, 0.1]]
        predicted_class = [[0, 0, 1, 1, 2, 2]]
        # Rank 0 of the three classes first (0.9, 0.7, 0.6: the most confident first), then rank 1 (0.85, 0.55, 0.1).
        assert select(confidence, predicted_class, num_kept=2, keep_top_k=2) == [[0, 4]]
        assert select(confidence, predicted_class, num_kept=4, keep_top_k=2) == [[0, 1, 2, 4]]

    def test_inactive_tokens_never_go_on_nor_count_as_context(self):
        confidence = [[0.1, 0.9, 0.3, 0.8]]
        active = [[False, True, True, True]]
        assert select(confidence, [[0, 0, 0, 0]], num_kept=2, keep_top_k=1, active=active) == [[1, 2]]
        assert select(confidence, [[0, 0, 0, 0]], num_kept=3, keep_top_k=1, active=active) == [[1, 2, 3]]

    @pytest.mark.parametrize("seed", range(4))
    def test_matches_the_per_image_loop_on_random_scores_with_ties(self, seed):
        generator = torch.Generator().manual_seed(seed)
        batch_size, num_tokens = 4, 48
        # Confidences on a coarse grid: many exact ties, within and across classes.
        confidence = torch.randint(0, 8, (batch_size, num_tokens), generator=generator).float() / 8
        predicted_class = torch.randint(0, 4, (batch_size, num_tokens), generator=generator)
        active_mask = torch.rand(batch_size, num_tokens, generator=generator) > 0.3
        num_active = int(active_mask.sum(dim=1).min())
        for keep_top_k in (0, 1, 2, 5, 50):
            for num_kept in (1, 3, num_active // 2, num_active):
                expected = reference_kept_tokens(confidence, predicted_class, active_mask, num_kept, keep_top_k)
                result = select_kept_tokens(confidence, predicted_class, active_mask, num_kept, keep_top_k)
                assert result.tolist() == expected, (keep_top_k, num_kept)

    def test_images_of_a_batch_are_independent(self):
        generator = torch.Generator().manual_seed(0)
        confidence = torch.rand(3, 20, generator=generator)
        predicted_class = torch.randint(0, 3, (3, 20), generator=generator)
        active = torch.ones(3, 20, dtype=torch.bool)
        batch = select_kept_tokens(confidence, predicted_class, active, 7, 2)
        for image in range(3):
            alone = select_kept_tokens(
                confidence[image : image + 1], predicted_class[image : image + 1], active[:1], 7, 2
            )
            assert torch.equal(alone[0], batch[image])


# --- inside the model ----------------------------------------------------------------------------------------------


CAPACITIES = (0.55, 0.3)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_model_keeps_exactly_what_the_per_image_loop_keeps(model_tester, varied_images, head_type, batch_size):
    model = model_tester(head_type=head_type, keep_top_k=2).create_model()
    pixel_values = varied_images(batch_size)  # mixed images: noise of growing amplitude
    with torch.no_grad():
        outputs = model(pixel_values, exit_mode="capacity", exit_capacity=CAPACITIES)
    num_tokens = outputs.exit_stage[0].numel()
    exit_stage = outputs.exit_stage.flatten(1)  # (batch, tokens)
    for stage, capacity in enumerate(CAPACITIES):
        # What the exit rule read after head `stage`: its class probabilities over the tokens still active.
        probabilities = model.class_probabilities(outputs.stage_logits[stage]).flatten(2)  # (batch, labels, tokens)
        confidence, predicted_class = probabilities.max(dim=1)
        active_mask = exit_stage >= stage
        num_kept = math.ceil(capacity * num_tokens)
        expected = reference_kept_tokens(confidence, predicted_class, active_mask, num_kept, keep_top_k=2)
        went_on = [torch.nonzero(row > stage)[:, 0].tolist() for row in exit_stage]
        assert went_on == expected, stage
    # Every image keeps the same count, the layers of each stage saw it.
    assert outputs.tokens_per_layer.tolist() == [[64, 64, 36, 20]] * batch_size
    # An image's result does not depend on its batch-mates.
    for image in range(batch_size):
        with torch.no_grad():
            alone = model(pixel_values[image : image + 1], exit_capacity=CAPACITIES)
        assert torch.equal(alone.exit_stage[0], outputs.exit_stage[image])
        torch.testing.assert_close(alone.logits[0], outputs.logits[image], rtol=0, atol=1e-5)


def test_exited_tokens_keep_their_prediction_as_in_threshold_mode(model_tester, varied_images, head_type):
    model = model_tester(head_type=head_type).create_model()
    with torch.no_grad():
        outputs = model(varied_images(3), exit_capacity=CAPACITIES)
    final_canvas = outputs.stage_mask_logits[-1]
    for stage in range(2):
        exited = outputs.exit_stage == stage  # (batch, h, w)
        assert exited.any()
        # The canvas keeps the exit head's values; the map is the final head's reading of the canvas (ATM: its
        # presence x sigmoid(canvas); FCN: the canvas itself).
        assert torch.equal(
            final_canvas.permute(1, 0, 2, 3)[:, exited],
            outputs.stage_mask_logits[stage].permute(1, 0, 2, 3)[:, exited],
        )
    head = model.dtop.heads[-1]
    class_logits = None if outputs.stage_class_logits is None else outputs.stage_class_logits[-1]
    expected_logits = head.class_scores(class_logits, final_canvas.flatten(2)).reshape(outputs.logits.shape)
    torch.testing.assert_close(outputs.logits, expected_logits, rtol=0, atol=0)


@pytest.mark.parametrize("use_cls_token", [False, True])
def test_capacity_one_is_the_unpruned_baseline_bit_for_bit(model_tester, varied_images, head_type, use_cls_token):
    model = model_tester(head_type=head_type, use_cls_token=use_cls_token).create_model()
    pixel_values = varied_images(3)
    with torch.no_grad():
        capacity = model(pixel_values, exit_capacity=1.0)
        threshold = model(pixel_values, exit_threshold=1.0)
    for name in ("logits", "exit_stage", "tokens_per_layer"):
        assert torch.equal(capacity[name], threshold[name]), name


def test_config_capacity_mode_and_prefix_tokens(model_tester, varied_images):
    model = model_tester(exit_mode="capacity", exit_capacity=CAPACITIES, use_cls_token=True).create_model()
    with torch.no_grad():
        outputs = model(varied_images(2), output_hidden_states=True)
    # The class token never exits; rows of exited tokens are zero in the hidden states of later layers.
    assert outputs.tokens_per_layer.tolist() == [[65, 65, 37, 21]] * 2
    last_hidden = outputs.hidden_states[-1][:, 1:]  # (batch, tokens, dim), prefix token dropped
    assert torch.equal(last_hidden.abs().sum(-1) > 0, (outputs.exit_stage.flatten(1) == 2))


def test_capacity_mode_in_training(model_tester, varied_images):
    model = model_tester(prune_during_training=True).create_model().train()
    pixel_values = varied_images(2)
    labels = torch.randint(0, 5, (2, 32, 32), generator=torch.Generator().manual_seed(0))
    outputs = model(pixel_values, labels=labels, exit_capacity=CAPACITIES)
    assert outputs.tokens_per_layer[:, -1].tolist() == [20, 20]
    outputs.loss.backward()
    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert not missing, missing
    # Without `prune_during_training`, training never exits a token (as in threshold mode).
    model.config.prune_during_training = False
    assert model(pixel_values, exit_capacity=CAPACITIES).tokens_per_layer[:, -1].tolist() == [64, 64]


# --- torch.compile -------------------------------------------------------------------------------------------------


def test_compiles_whole_without_recompiles_and_equals_eager(model_tester, varied_images):
    # fullgraph=True fails on any graph break; recompiles are decided by dynamo's guards, whatever the backend, so the
    # cheap "eager" backend checks them (inductor would take minutes on a 2-core CPU).
    from torch._dynamo.utils import counters

    model = model_tester(head_num_layers=1, exit_mode="capacity", exit_capacity=CAPACITIES).create_model()
    batches = [varied_images(3, seed=seed).flip(0) if seed % 2 else varied_images(3, seed=seed) for seed in range(5)]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    try:
        with torch.no_grad():
            for pixel_values in batches:
                outputs, expected = compiled(pixel_values), model(pixel_values)
                assert torch.equal(outputs.exit_stage, expected.exit_stage)
                assert torch.equal(outputs.tokens_per_layer, expected.tokens_per_layer)
                torch.testing.assert_close(outputs.logits, expected.logits, rtol=0, atol=1e-6)
        assert counters["stats"]["unique_graphs"] == 1  # one graph for the whole stream: no recompile
        assert not counters["graph_break"]
    finally:
        torch._dynamo.reset()


def test_exit_path_under_inductor_equals_eager(model_tester, varied_images):
    # Inductor itself, on the capacity exit path of two stages: the stage's float32 scores over the grid, the
    # selection over the packed rows, and the new tokens (their exit stages, the dense packing's active mask, the
    # kept hidden rows). (torch 2.13's CPU inductor miscompiled a boolean scatter fused with its reader, which made
    # every token read as inactive.) The whole model takes minutes to compile on a 2-core CPU.
    from dtop_hf.pruning import ActiveTokens, update_canvas

    model = model_tester(keep_top_k=2).create_model()
    with torch.no_grad():
        outputs = model(varied_images(3), exit_capacity=1.0)
    class_logits = outputs.stage_class_logits[0]
    mask_logits = outputs.stage_mask_logits[0].flatten(2).transpose(1, 2).reshape(-1, class_logits.shape[1])
    hidden_states = torch.randn(mask_logits.shape[0], 16)

    def keep(class_logits, mask_logits, hidden_states):
        tokens = ActiveTokens.all_active(class_logits.shape[0], (8, 8), 0, 3, class_logits.device)
        canvas = None
        results = []
        for stage, capacity in enumerate(CAPACITIES):
            # The second stage reads the first's values again, for the rows that went on.
            head_values = tokens.patches.from_grid(mask_logits.reshape(-1, 64, mask_logits.shape[1]))
            canvas = update_canvas(canvas, head_values, tokens.patches)
            scores = model.dtop.stage_scores(model.dtop.heads[stage], class_logits, canvas.transpose(1, 2))
            kept_rows = model.dtop.select_kept(model.dtop.heads[stage], scores, tokens, capacity)
            tokens, hidden_states, _ = tokens.keep(kept_rows, stage, hidden_states)
            results += [kept_rows, tokens.exit_stage, tokens.active_mask, hidden_states]
        return results

    torch._dynamo.reset()
    try:
        compiled = torch.compile(keep, fullgraph=True)  # the default backend, inductor
        expected = keep(class_logits, mask_logits, hidden_states)
        assert expected[2].sum(dim=1).tolist() == [math.ceil(CAPACITIES[0] * 64)] * 3
        assert expected[6].sum(dim=1).tolist() == [math.ceil(CAPACITIES[1] * 64)] * 3
        for result, reference in zip(compiled(class_logits, mask_logits, hidden_states), expected):
            assert torch.equal(result, reference)
    finally:
        torch._dynamo.reset()
