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
"""Tests of the pure pruning functions on hand-made tensors: exit rule, canvas, scores, packing."""

import pytest
import torch

from dtop_hf.pruning import (
    ActiveTokens,
    TokenPacking,
    atm_class_scores,
    pack_tokens,
    select_exiting_tokens,
    token_confidence,
    tokens_to_grid,
    update_canvas,
)


def as_batch(*rows, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def select(confidence, predicted_class, threshold, keep_top_k, active=None) -> list[list[bool]]:
    confidence = as_batch(*confidence) if not torch.is_tensor(confidence) else confidence
    predicted_class = (
        as_batch(*predicted_class, dtype=torch.long) if not torch.is_tensor(predicted_class) else predicted_class
    )
    active = torch.ones_like(confidence, dtype=torch.bool) if active is None else as_batch(*active, dtype=torch.bool)
    exit_mask = select_exiting_tokens(confidence, predicted_class, active, threshold, keep_top_k)
    assert exit_mask.dtype == torch.bool and exit_mask.shape == confidence.shape
    return exit_mask.tolist()


def reference_exit_mask(confidence, predicted_class, active_mask, threshold, keep_top_k) -> torch.Tensor:
    """The threshold exit rule written as plain loops: per image and class, the k best candidates stay (ties: earlier
    token first), the other candidates exit."""
    exit_mask = torch.zeros_like(active_mask)
    for image in range(confidence.shape[0]):
        candidates = [
            token
            for token in range(confidence.shape[1])
            if active_mask[image, token] and confidence[image, token].item() > threshold
        ]
        for label in {int(predicted_class[image, token]) for token in candidates}:
            of_label = [token for token in candidates if int(predicted_class[image, token]) == label]
            of_label.sort(key=lambda token: (-confidence[image, token].item(), token))
            for token in of_label[keep_top_k:]:
                exit_mask[image, token] = True
    return exit_mask


class TestSelectExitingTokens:
    def test_top_k_per_class_stay_and_other_candidates_exit(self):
        confidence = [[0.95, 0.91, 0.97, 0.50, 0.92, 0.99]]
        predicted_class = [[0, 0, 0, 1, 1, 1]]
        # Candidates: 0, 1, 2 (class 0) and 4, 5 (class 1); the best of each class (2 and 5) stay.
        assert select(confidence, predicted_class, 0.9, keep_top_k=1) == [[True, True, False, False, True, False]]
        # k = 2: tokens 0 and 2 stay for class 0; class 1 has only 2 candidates, both stay.
        assert select(confidence, predicted_class, 0.9, keep_top_k=2) == [[False, True, False, False, False, False]]

    def test_fewer_candidates_than_k_all_stay(self):
        confidence = [[0.95, 0.96, 0.97, 0.93, 0.94]]
        predicted_class = [[0, 0, 0, 1, 1]]
        assert select(confidence, predicted_class, 0.9, keep_top_k=3) == [[False] * 5]
        assert select(confidence, predicted_class, 0.9, keep_top_k=5) == [[False] * 5]

    def test_no_candidates_nothing_exits(self):
        confidence = [[0.10, 0.89, 0.90, 0.30]]
        assert select(confidence, [[0, 1, 2, 3]], 0.9, keep_top_k=0) == [[False] * 4]
        assert select(confidence, [[0, 0, 0, 0]], 0.9, keep_top_k=1) == [[False] * 4]

    def test_threshold_is_strict(self):
        # A confidence equal to the threshold is not a candidate, even with k = 0.
        confidence = [[0.9, 0.9, 0.9000001, 0.5]]
        assert select(confidence, [[0, 1, 2, 3]], 0.9, keep_top_k=0) == [[False, False, True, False]]
        # Float32 values compared with a Python float threshold: 0.75 is exact in both.
        assert select([[0.75, 0.75]], [[0, 0]], 0.75, keep_top_k=0) == [[False, False]]

    def test_threshold_one_never_prunes(self):
        # Scores are probabilities: even a confidence of exactly 1.0 does not exceed the threshold 1.0.
        confidence = [[1.0, 1.0, 1.0, 0.999999]]
        assert select(confidence, [[0, 0, 1, 1]], 1.0, keep_top_k=0) == [[False] * 4]

    def test_k_zero_every_candidate_exits(self):
        confidence = [[0.95, 0.91, 0.97, 0.50, 0.92]]
        assert select(confidence, [[0, 0, 0, 1, 1]], 0.9, keep_top_k=0) == [[True, True, True, False, True]]

    def test_ties_keep_the_earlier_tokens(self):
        confidence = [[0.95, 0.95, 0.95, 0.95]]
        predicted_class = [[2, 2, 2, 2]]
        assert select(confidence, predicted_class, 0.9, keep_top_k=1) == [[False, True, True, True]]
        assert select(confidence, predicted_class, 0.9, keep_top_k=2) == [[False, False, True, True]]
        # A tie below a higher value: the higher one stays first, then the earlier of the tied ones.
        assert select([[0.95, 0.95, 0.99]], [[2, 2, 2]], 0.9, keep_top_k=2) == [[False, True, False]]

    def test_several_classes_are_independent(self):
        confidence = [[0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99]]
        predicted_class = [[0, 1, 2, 0, 1, 2, 0, 1, 2]]
        # k = 2: per class the two best stay: tokens 3, 6 / 4, 7 / 5, 8. The worst of each class exits.
        expected = [[True, True, True, False, False, False, False, False, False]]
        assert select(confidence, predicted_class, 0.9, keep_top_k=2) == expected

    def test_inactive_tokens_neither_exit_nor_take_a_keep_slot(self):
        confidence = [[0.99, 0.95, 0.93, 0.97]]
        predicted_class = [[0, 0, 0, 0]]
        active = [[False, True, True, False]]
        # Only tokens 1 and 2 compete: 1 stays, 2 exits; inactive 0 and 3 (more confident) are not counted.
        assert select(confidence, predicted_class, 0.9, keep_top_k=1, active=active) == [[False, False, True, False]]

    def test_images_of_a_batch_are_independent(self):
        confidence = as_batch([0.95, 0.96, 0.97, 0.2], [0.2, 0.3, 0.4, 0.5], [0.99, 0.98, 0.97, 0.96])
        predicted_class = as_batch([0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], dtype=torch.long)
        active = torch.ones(3, 4, dtype=torch.bool)
        batch_mask = select_exiting_tokens(confidence, predicted_class, active, 0.9, 1)
        assert batch_mask.tolist() == [[True, True, False, False], [False] * 4, [False, True, True, True]]
        for image in range(3):
            alone = select_exiting_tokens(
                confidence[image : image + 1], predicted_class[image : image + 1], active[image : image + 1], 0.9, 1
            )
            assert torch.equal(alone[0], batch_mask[image])

    @pytest.mark.parametrize("seed", range(6))
    def test_matches_loop_reference_on_random_scores_with_ties(self, seed):
        generator = torch.Generator().manual_seed(seed)
        batch_size, num_tokens, num_labels = 3, 40, 4
        # Confidences on a coarse grid of values produce many exact ties and values equal to the threshold.
        confidence = torch.randint(0, 11, (batch_size, num_tokens), generator=generator).float() / 10
        predicted_class = torch.randint(0, num_labels, (batch_size, num_tokens), generator=generator)
        active_mask = torch.rand(batch_size, num_tokens, generator=generator) > 0.2
        for threshold in (0.5, 0.7, 1.0):
            for keep_top_k in (0, 1, 2, 5, 50):
                expected = reference_exit_mask(confidence, predicted_class, active_mask, threshold, keep_top_k)
                result = select_exiting_tokens(confidence, predicted_class, active_mask, threshold, keep_top_k)
                assert torch.equal(result, expected), (threshold, keep_top_k)
        assert not select_exiting_tokens(confidence, predicted_class, active_mask, 1.0, 0).any()


class TestScores:
    def test_atm_class_scores_are_presence_times_sigmoid(self):
        class_logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # (1, 2 labels, 2)
        mask_logits = torch.tensor([[[0.0, 1.0, -1.0], [3.0, 0.0, 2.0]]])  # (1, 2 labels, 3 tokens)
        presence = torch.tensor([1 / (1 + torch.e**-2), 1 / (1 + torch.e)])
        expected = presence[None, :, None] * torch.sigmoid(mask_logits)
        torch.testing.assert_close(atm_class_scores(class_logits, mask_logits), expected, rtol=0, atol=1e-7)

    def test_token_confidence_is_max_and_argmax_over_classes(self):
        scores = torch.tensor([[[0.1, 0.7, 0.2], [0.6, 0.2, 0.3], [0.3, 0.1, 0.5]]])  # (1, 3 labels, 3 tokens)
        confidence, predicted_class = token_confidence(scores)
        assert confidence[0].tolist() == pytest.approx([0.6, 0.7, 0.5])
        assert predicted_class.tolist() == [[1, 0, 2]] and predicted_class.dtype == torch.long

    def test_update_canvas_writes_only_active_tokens(self):
        canvas = torch.full((2, 4, 3), -1.0)  # (batch, tokens, num_labels)
        active = torch.tensor([[True, False, True, False], [False, False, False, False]])
        head_values = torch.arange(6, dtype=torch.float32).reshape(2, 3)  # the two active tokens' values, packed
        updated = update_canvas(canvas, head_values, pack_tokens(active))
        assert torch.equal(updated[0, [0, 2]], head_values)
        assert torch.equal(updated[0, [1, 3]], canvas[0, [1, 3]])
        assert torch.equal(updated[1], canvas[1])
        assert (canvas == -1.0).all()  # out of place

    def test_update_canvas_dense_packing_matches_masked_select(self):
        # Capacity mode's dense packing (two tokens per image) writes the same rows as a select over the grid.
        canvas = torch.randn(2, 5, 3)
        token_index = torch.tensor([[1, 4], [0, 2]])
        packing = TokenPacking.dense(token_index, 5)
        head_values = torch.randn(4, 3)
        grid_values = torch.zeros(2, 5, 3)
        grid_values[torch.arange(2)[:, None], token_index] = head_values.reshape(2, 2, 3)
        expected = torch.where(packing.active_mask[:, :, None], grid_values, canvas)
        assert torch.equal(update_canvas(canvas, head_values, packing), expected)

    def test_dense_packing_knows_each_rows_token(self):
        token_index = torch.tensor([[1, 4], [0, 2]])
        assert torch.equal(TokenPacking.dense(token_index, 5).padded_token_index(), token_index)

    def test_update_canvas_first_head_is_its_grid(self):
        active = torch.ones(2, 4, dtype=torch.bool)
        head_values = torch.randn(8, 3)
        assert torch.equal(update_canvas(None, head_values, pack_tokens(active)), head_values.reshape(2, 4, 3))

    def test_tokens_to_grid_is_row_major(self):
        values = torch.arange(2 * 6, dtype=torch.float32).reshape(1, 2, 6)  # (batch, channels, tokens)
        grid = tokens_to_grid(values, (2, 3))
        assert grid.shape == (1, 2, 2, 3)
        assert grid[0, 1, 1, 0].item() == values[0, 1, 3].item()  # row 1, column 0 = token 1 * 3 + 0


class TestTokenPacking:
    def test_all_active_is_uniform_and_free(self):
        packing = pack_tokens(torch.ones(3, 5, dtype=torch.bool))
        assert packing.is_uniform and packing.key_padding_mask is None
        assert packing.total == 15 and packing.max_count == 5 and packing.counts.tolist() == [5, 5, 5]
        grid = torch.randn(3, 5, 4)
        packed = packing.from_grid(grid)
        assert torch.equal(packed, grid.reshape(15, 4))
        assert torch.equal(packing.to_padded(packed), grid)
        assert torch.equal(packing.to_grid(packed), grid)
        assert torch.equal(packing.from_padded(grid), packed)

    def test_round_trips_with_different_counts(self):
        active_mask = torch.tensor([[True, False, True, True, False], [False, False, True, False, False], [True] * 5])
        packing = pack_tokens(active_mask)
        assert not packing.is_uniform
        assert packing.counts.tolist() == [3, 1, 5] and packing.max_count == 5 and packing.total == 9
        # Packed order: image-major, then token order.
        assert packing.flat_index.tolist() == [0, 2, 3, 7, 10, 11, 12, 13, 14]
        grid = torch.randn(3, 5, 2)
        packed = packing.from_grid(grid)
        assert torch.equal(packed, grid[active_mask])
        regridded = packing.to_grid(packed, fill=-7.0)
        assert torch.equal(regridded[active_mask], grid[active_mask])
        assert (regridded[~active_mask] == -7.0).all()
        padded = packing.to_padded(packed)  # (batch, max_count, 2)
        assert padded.shape == (3, 5, 2)
        assert torch.equal(padded[0, :3], grid[0, [0, 2, 3]])  # padding slots: any value, masked out
        assert torch.equal(padded[1, :1], grid[1, [2]])
        assert torch.equal(padded[2], grid[2])
        assert torch.equal(packing.from_padded(padded), packed)
        assert packing.key_padding_mask.tolist() == [[True] * 3 + [False] * 2, [True] + [False] * 4, [True] * 5]
        assert packing.padded_token_index().tolist() == [[0, 2, 3, 5, 5], [2, 5, 5, 5, 5], [0, 1, 2, 3, 4]]

    def test_image_without_active_tokens(self):
        active_mask = torch.tensor([[False, False, False], [True, False, True]])
        packing = pack_tokens(active_mask)
        assert packing.counts.tolist() == [0, 2] and packing.max_count == 2
        grid = torch.randn(2, 3, 4)
        packed = packing.from_grid(grid)
        assert packed.shape == (2, 4)
        padded = packing.to_padded(packed)
        assert padded.shape == (2, 2, 4) and torch.equal(padded[1], grid[1, [0, 2]])
        assert torch.equal(packing.from_padded(padded), packed)
        assert packing.key_padding_mask.tolist() == [[False, False], [True, True]]

    def test_batch_without_any_active_token(self):
        packing = pack_tokens(torch.zeros(2, 3, dtype=torch.bool))
        assert packing.total == 0 and packing.max_count == 0 and packing.counts.tolist() == [0, 0]
        packed = packing.from_grid(torch.randn(2, 3, 4))
        assert packed.shape == (0, 4)
        assert packing.to_padded(packed).shape == (2, 0, 4)
        assert (packing.to_grid(packed, fill=3.0) == 3.0).all()

    def test_features_of_any_rank(self):
        active_mask = torch.tensor([[True, False], [True, True]])
        packing = pack_tokens(active_mask)
        grid = torch.randn(2, 2, 3, 4)  # (batch, tokens, heads, head_dim)
        packed = packing.from_grid(grid)
        assert packed.shape == (3, 3, 4)
        assert torch.equal(packing.from_padded(packing.to_padded(packed)), packed)
        assert torch.equal(packing.to_grid(packed)[active_mask], grid[active_mask])

    def test_counts_known_on_the_host_give_the_same_packing(self):
        active_mask = torch.tensor([[True, False, True, True, False], [False, False, True, False, False], [True] * 5])
        read, given = pack_tokens(active_mask), pack_tokens(active_mask, [3, 1, 5])
        for field in ("flat_index", "counts", "padded_index", "slot_source", "key_padding_mask", "cu_seqlens"):
            assert torch.equal(getattr(read, field), getattr(given, field)), field
        assert given.cu_seqlens.tolist() == [0, 3, 4, 9] and given.cu_seqlens.dtype == torch.int32

    def test_uniform_packing_after_exits_maps_slots_to_grid_tokens(self):
        # Equal counts per image, but not every token: the padded layout is the packed one, of width 2, not 4.
        active_mask = torch.tensor([[True, False, False, True], [False, True, True, False]])
        packing = pack_tokens(active_mask)
        assert packing.is_uniform and not packing.is_complete and packing.max_count == 2
        assert packing.padded_token_index().tolist() == [[0, 3], [1, 2]]
        weights = torch.arange(8, dtype=torch.float32).reshape(2, 1, 2, 2)  # (batch, heads, max_count, max_count)
        grid = packing.attention_to_grid(weights)
        assert grid.shape == (2, 1, 4, 4)
        assert grid[0, 0].tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0], [2, 0, 0, 3]]
        assert grid[1, 0].tolist() == [[0, 0, 0, 0], [0, 4, 5, 0], [0, 6, 7, 0], [0, 0, 0, 0]]


class TestActiveTokens:
    def test_prefix_tokens_stay_and_never_reach_the_heads(self):
        tokens = ActiveTokens.all_active(2, (2, 2), num_prefix_tokens=2, num_stages=3, device=torch.device("cpu"))
        assert tokens.sequence.total == 12 and tokens.patches.total == 8
        assert (tokens.exit_stage == 2).all()
        hidden_states = torch.arange(12.0)[:, None]  # image 0: rows 0-1 prefix, 2-5 patches; image 1: 6-7, 8-11
        assert tokens.patch_rows(hidden_states).flatten().tolist() == [2, 3, 4, 5, 8, 9, 10, 11]

        exit_mask = torch.tensor([[True, False, False, True], [True, True, True, True]])
        after, kept, _ = tokens.after_exit(exit_mask, 0, hidden_states)
        assert after.exit_stage.tolist() == [[0, 2, 2, 0], [0, 0, 0, 0]]
        assert after.patches.counts.tolist() == [2, 0] and after.sequence.counts.tolist() == [4, 2]
        assert kept.flatten().tolist() == [0, 1, 3, 4, 6, 7]  # prefix rows always stay
        assert after.patch_rows(kept).flatten().tolist() == [3, 4]
        assert after.sequence.cu_seqlens.tolist() == [0, 4, 6] and after.patches.cu_seqlens.tolist() == [0, 2, 2]

    def test_rotary_rows_travel_with_their_tokens(self):
        tokens = ActiveTokens.all_active(1, (1, 3), num_prefix_tokens=0, num_stages=2, device=torch.device("cpu"))
        hidden_states, cos, sin = torch.randn(3, 4), torch.randn(3, 2), torch.randn(3, 2)
        exit_mask = torch.tensor([[False, True, False]])
        _, kept, (kept_cos, kept_sin) = tokens.after_exit(exit_mask, 0, hidden_states, (cos, sin))
        assert torch.equal(kept, hidden_states[[0, 2]]) and torch.equal(kept_cos, cos[[0, 2]])
        assert torch.equal(kept_sin, sin[[0, 2]])

    @pytest.mark.parametrize("num_prefix_tokens", [0, 2])
    def test_padded_exits_keep_what_packed_exits_keep(self, num_prefix_tokens):
        # Two exits, leaving 3 / 1 / 4 then 2 / 0 / 3 tokens (an empty image): the padded layout gives every image the
        # batch's largest count of slots, real slots first in token order, padding slots holding exited tokens.
        tokens = ActiveTokens.all_active(3, (2, 3), num_prefix_tokens, num_stages=3, device=torch.device("cpu"))
        hidden_states = torch.randn(tokens.sequence.total, 4)
        exits = [
            torch.tensor([[True, False, True, False, False, True], [1, 1, 0, 1, 1, 1], [0, 1, 0, 0, 1, 0]]).bool(),
            torch.tensor([[False, False, False, True, False, False], [0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]]).bool(),
        ]
        packed, padded = (tokens, hidden_states), (tokens, hidden_states)
        for stage, exit_mask in enumerate(exits):
            packed = packed[0].after_exit(exit_mask, stage, packed[1])[:2]
            padded = padded[0].after_exit_padded(exit_mask, stage, padded[1])[:2]
            (packed_tokens, packed_rows), (padded_tokens, padded_rows) = packed, padded
            assert torch.equal(padded_tokens.active_mask, packed_tokens.active_mask)
            assert torch.equal(padded_tokens.exit_stage, packed_tokens.exit_stage)
            patches = padded_tokens.patches
            assert patches.padding_rows and patches.max_count == packed_tokens.patches.max_count
            assert torch.equal(patches.counts, packed_tokens.patches.counts)
            # The real slots hold the packed rows, in the same order; the grid holds the same values.
            real_rows = padded_tokens.patch_rows(padded_rows)[patches.key_padding_mask.reshape(-1)]
            assert torch.equal(real_rows, packed_tokens.patch_rows(packed_rows))
            # Each slot's token, `tokens` at padding slots, as the packed layout's padded view has them.
            assert torch.equal(patches.padded_token_index(), packed_tokens.patches.padded_token_index())
            grid = torch.full((3 * 6, 4), -1.0)
            assert torch.equal(
                patches.write_rows(grid, padded_tokens.patch_rows(padded_rows)),
                packed_tokens.patches.write_rows(grid, packed_tokens.patch_rows(packed_rows)),
            )
            if num_prefix_tokens:  # the prefix rows lead every image's slots
                sequence = padded_tokens.sequence
                assert sequence.padding_rows and sequence.key_padding_mask[:, :num_prefix_tokens].all()
        assert padded[0].patches.counts.tolist() == [2, 0, 3]
        assert padded[0].patches.padded_token_index().tolist() == [[1, 4, 6], [6, 6, 6], [0, 2, 5]]
