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
"""Tests of the official training recipe inside the model: drop path, head
initialisation, the exit decision in float32 under bf16 autocast, and when thresholds apply in training."""

import math

import pytest
import torch
from transformers.testing_utils import CaptureLogger

import dtop_hf.modeling_dtop as modeling_dtop
from dtop_hf.modeling_dtop import DToPDropPath, DToPLayer
from dtop_hf.pruning import pack_tokens


# --- drop path (stochastic depth) ------------------------------------------------------------------------------


def test_drop_path_rate_rises_linearly_over_the_layers(model_tester):
    model = model_tester(num_hidden_layers=5, drop_path_rate=0.3).create_model()
    rates = [layer.drop_path.drop_prob for layer in model.dtop.layers]
    # mmseg: dpr = torch.linspace(0, drop_path_rate, num_layers)
    expected = torch.linspace(0, 0.3, 5, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(rates, dtype=torch.float64), expected)
    assert all(layer.drop_path.drop_prob == 0.0 for layer in model_tester().create_model().dtop.layers)


def test_drop_path_is_off_in_eval(model_tester, head_type):
    with_drop_path = model_tester(head_type=head_type, drop_path_rate=0.5).create_model(seed=3)
    without = model_tester(head_type=head_type).create_model(seed=3)  # same weights: drop path has none
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = without(pixel_values).logits
        for _ in range(3):
            assert torch.equal(with_drop_path(pixel_values).logits, expected)


def test_drop_path_is_on_in_training(model_tester, head_type):
    model = model_tester(head_type=head_type, drop_path_rate=0.5, head_dropout=0.0).create_model().train()
    pixel_values = torch.randn(4, 3, 32, 32)
    outputs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outputs.append(model(pixel_values).logits)
    assert torch.equal(outputs[0], outputs[1])  # the randomness is torch's: seeded, reproducible
    assert not torch.equal(outputs[0], outputs[2])
    # Only the drop path is random here: at rate 0 training mode is deterministic and equals eval mode.
    model_without = model_tester(head_type=head_type, head_dropout=0.0).create_model().train()
    with torch.no_grad():
        assert torch.equal(model_without(pixel_values).logits, model_without.eval()(pixel_values).logits)


def test_drop_path_drops_whole_images_and_rescales_the_kept_ones():
    drop_path = DToPDropPath(0.5).train()
    active_mask = torch.rand(400, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    packing = pack_tokens(active_mask)  # images with different numbers of packed rows
    branch = torch.ones(packing.total, 3)
    torch.manual_seed(0)
    scaled = drop_path(branch, packing)
    image_of_row = packing.row_image_index
    per_image = torch.zeros(400).index_copy(0, image_of_row, scaled[:, 0])  # one of each image's rows
    # Every row of an image gets its image's factor: 0 (dropped) or 1 / (1 - 0.5) (kept).
    assert torch.equal(scaled[:, 0], per_image[image_of_row]) and (scaled == scaled[:, :1]).all()
    present = packing.counts > 0
    assert set(per_image[present].tolist()) == {0.0, 2.0}
    assert abs((per_image[present] == 2.0).float().mean().item() - 0.5) < 0.1
    assert torch.equal(drop_path.eval()(branch, packing), branch)


def test_drop_path_is_on_the_mlp_branch_only(model_tester):
    # mmseg 1.x's ViT layer: x = x + attn(ln1(x)); x = x + drop_path(ffn(ln2(x))). With a rate so high that every
    # image's MLP branch is dropped, the layer is exactly the attention half; the attention branch is never dropped.
    config = model_tester().get_config()
    torch.manual_seed(0)
    layer = DToPLayer(config, drop_path_rate=0.999999).train()
    packing = pack_tokens(torch.ones(3, 16, dtype=torch.bool))
    hidden_states = torch.randn(packing.total, config.hidden_size)
    with torch.no_grad():
        attention_half = hidden_states + layer.attention(layer.layernorm_before(hidden_states), packing, None)[0]
        torch.manual_seed(0)
        output, _ = layer(hidden_states, packing, None)
        assert torch.equal(output, attention_half)
        full, _ = layer.eval()(hidden_states, packing, None)
        assert not torch.allclose(full, attention_half)


# --- head initialisation, as the official code does it --------------------------------------------------------------


@pytest.fixture(scope="module")
def initialised_heads():
    """Heads wide enough for statistics: 64-wide, 40 classes, 2 decoder layers."""
    from conftest import DToPModelTester

    tester = DToPModelTester(head_hidden_size=64, head_num_attention_heads=4, head_num_layers=2, num_labels=40)
    return tester.create_model(seed=0).dtop.heads


def head_linears(heads, exclude_query_self_attention_inputs: bool):
    for name, module in heads.named_modules():
        is_packed_input = ".self_attn." in f".{name}" and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")
        if isinstance(module, torch.nn.Linear) and not (exclude_query_self_attention_inputs and is_packed_input):
            yield name, module


def test_every_head_linear_is_truncated_normal_with_zero_bias(initialised_heads):
    linears = list(head_linears(initialised_heads, exclude_query_self_attention_inputs=True))
    names = {name.split(".", 1)[1] for name, _ in linears}
    expected_names = {"input_proj", "class_embed", "layers.0.linear1", "layers.0.cross_attn.q_proj"}
    assert expected_names | {"layers.0.self_attn.o_proj"} <= names
    weights = torch.cat([module.weight.flatten() for _, module in linears])
    # trunc_normal(std=0.02, a=-2, b=2): the cut at +-2 is 100 std away, so the values are N(0, 0.02) in practice.
    assert abs(weights.std().item() - 0.02) < 0.001 and abs(weights.mean().item()) < 0.001
    for name, module in linears:
        assert module.weight.std().item() == pytest.approx(0.02, rel=0.25), name
        assert torch.equal(module.bias, torch.zeros_like(module.bias)), name


def test_head_layer_norms_are_one_and_zero(initialised_heads):
    norms = [module for module in initialised_heads.modules() if isinstance(module, torch.nn.LayerNorm)]
    assert len(norms) == 3 * (1 + 3 * 2)  # per head: proj_norm, and norm1-3 per decoder layer
    assert all((norm.weight == 1).all() and (norm.bias == 0).all() for norm in norms)


def test_class_queries_are_standard_normal(initialised_heads):
    # nn.Embedding's PyTorch default, kept by the official code: N(0, 1).
    queries = torch.cat([head.queries.weight.flatten() for head in initialised_heads])  # 3 x 40 x 64 values
    assert abs(queries.std().item() - 1.0) < 0.05 and abs(queries.mean().item()) < 0.05
    assert queries.abs().max() > 3.0  # not truncated at 2 std


def test_query_self_attention_inputs_are_xavier_uniform_of_the_packed_projection(initialised_heads):
    dim = 64
    # nn.MultiheadAttention's in_proj_weight (3 dim, dim): xavier_uniform_ draws U(-a, a) with
    # a = sqrt(6 / (fan_in + fan_out)), fan_in = dim, fan_out = 3 dim; its in_proj_bias is zero.
    packed = torch.empty(3 * dim, dim)
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(packed)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    for head in initialised_heads:
        for layer in head.layers:
            attention = layer.self_attn
            weights = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
            assert weights.shape == packed.shape
            assert weights.abs().max() <= bound and weights.abs().max() > 0.95 * bound
            assert weights.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
                assert (projection.bias == 0).all()
            assert attention.o_proj.weight.std().item() == pytest.approx(0.02, rel=0.25)  # a head Linear


# --- when thresholds apply -------------------------------------------------------------------------------------------


def test_training_mode_does_not_prune_unless_the_config_says_so(model_tester, head_type):
    # Threshold 0.01: every token is a candidate, keep_top_k 0: every token exits at the first head.
    model = model_tester(head_type=head_type, keep_top_k=0, exit_threshold=0.01, head_dropout=0.0).create_model()
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    last_stage = model.config.num_stages - 1
    assert not model.config.prune_during_training  # the default
    with torch.no_grad():
        eval_outputs = model(pixel_values)
    assert (eval_outputs.exit_stage == 0).all()  # eval mode: the thresholds apply, whatever the flag

    model.train()
    modeling_dtop.logger.warning_once.cache_clear()
    with CaptureLogger(modeling_dtop.logger) as captured:
        outputs = model(pixel_values, labels=labels)  # the config's threshold
        overridden = model(pixel_values, labels=labels, exit_threshold=0.01)  # and a per-call one
    for training_outputs in (outputs, overridden):
        assert (training_outputs.exit_stage == last_stage).all() and (training_outputs.tokens_per_layer == 64).all()
    assert "ignored in training mode unless `config.prune_during_training=True`" in captured.out

    model.config.prune_during_training = True
    pruned = model(pixel_values, labels=labels)
    assert torch.equal(pruned.exit_stage, eval_outputs.exit_stage)
    assert (pruned.tokens_per_layer[:, 2:] == 0).all()
    with torch.no_grad():
        assert torch.equal(model.eval()(pixel_values).exit_stage, eval_outputs.exit_stage)


def test_trainer_keeps_only_the_logits_at_evaluation(model_tester):
    # transformers.Trainer drops every output key listed in `config.keys_to_ignore_at_inference` (and the loss).
    model = model_tester().create_model()
    outputs = model(torch.randn(1, 3, 32, 32), labels=torch.zeros(1, 32, 32, dtype=torch.long))
    kept = [key for key in outputs.keys() if key not in model.config.keys_to_ignore_at_inference + ["loss"]]
    assert kept == ["logits"]
    all_fields = set(type(outputs).__dataclass_fields__)
    assert all_fields - set(model.config.keys_to_ignore_at_inference) == {"loss", "logits"}


# --- the exit decision in float32 ----------------------------------------------------------------------------------


def record_exit_rule_inputs(monkeypatch) -> list[dict]:
    """Wrap the exit rule the model calls; return the list its inputs are appended to, one dict per call."""
    calls = []
    original = modeling_dtop.select_exiting_tokens

    def recording(confidence, predicted_class, active_mask, threshold, keep_top_k):
        calls.append({"confidence": confidence, "predicted_class": predicted_class, "active_mask": active_mask})
        return original(confidence, predicted_class, active_mask, threshold, keep_top_k)

    monkeypatch.setattr(modeling_dtop, "select_exiting_tokens", recording)
    return calls


@pytest.mark.parametrize("keep_top_k", [0, 2])
def test_bf16_exit_decisions_are_taken_in_float32(
    model_tester, varied_images, exit_thresholds, head_type, monkeypatch, keep_top_k
):
    model = model_tester(head_type=head_type, keep_top_k=keep_top_k).create_model()
    pixel_values = varied_images(3)
    threshold = exit_thresholds(model, pixel_values)[0]
    calls = record_exit_rule_inputs(monkeypatch)
    linear_dtypes = []
    model.dtop.layers[0].mlp.fc1.register_forward_hook(lambda module, args, output: linear_dtypes.append(output.dtype))
    with torch.no_grad():
        fp32 = model(pixel_values, exit_threshold=(threshold, 1.0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(pixel_values, exit_threshold=(threshold, 1.0))
    assert linear_dtypes == [torch.float32, torch.bfloat16]  # the model really ran in bf16
    fp32_call, bf16_call = calls
    assert bf16_call["confidence"].dtype == torch.float32
    # The confidences the rule received in bf16 are not quantised to bf16's steps, and (the ranking inside a class
    # being the mask logits' for ATM, computed in float32 too) a class's candidates almost never tie.
    confidence = bf16_call["confidence"]
    assert not torch.equal(confidence, confidence.bfloat16().float())
    candidate_keys = torch.stack([bf16_call["predicted_class"], confidence], dim=-1)[confidence > threshold]
    if head_type == "atm":
        tied = len(candidate_keys) - len(candidate_keys.unique(dim=0))
        assert tied <= 0.01 * len(candidate_keys), (tied, len(candidate_keys))
    # Recomputed in float32 from the bf16 run's own logits, they are what the rule received.
    head = model.dtop.heads[0]
    class_logits = None if bf16.stage_class_logits is None else bf16.stage_class_logits[0].float()
    scores = head.class_scores(class_logits, bf16.stage_mask_logits[0].flatten(2).float())
    torch.testing.assert_close(head.scores_to_probabilities(scores).amax(dim=1), confidence, rtol=0, atol=0)

    # Exit maps differ from fp32 only where the bf16-computed confidence crossed the threshold (k = 0), or where it
    # changed the ranking inside a class's top k (k > 0); nowhere else.
    changed = bf16.exit_stage.flatten(1) != fp32.exit_stage.flatten(1)
    crossed = (bf16_call["confidence"] > threshold) != (fp32_call["confidence"] > threshold)
    if keep_top_k == 0:
        assert torch.equal(changed, crossed)
    else:
        assert not (changed & ~crossed & ~ranking_changed(fp32_call, bf16_call, threshold)).any()


def ranking_changed(fp32_call: dict, bf16_call: dict, threshold: float) -> torch.Tensor:
    """`(batch, tokens)` True for the candidates of (image, class) groups whose order by confidence differs
    between the two runs (the top-k may then keep other tokens)."""
    changed = torch.zeros_like(fp32_call["active_mask"])
    for image in range(changed.shape[0]):
        for label in torch.cat([fp32_call["predicted_class"][image], bf16_call["predicted_class"][image]]).unique():
            orders = []
            for call in (fp32_call, bf16_call):
                members = (call["predicted_class"][image] == label) & (call["confidence"][image] > threshold)
                tokens = members.nonzero().flatten()
                orders.append(tokens[call["confidence"][image, tokens].argsort(descending=True, stable=True)].tolist())
            if orders[0] != orders[1]:
                for call in (fp32_call, bf16_call):
                    changed[image] |= call["predicted_class"][image] == label
    return changed
