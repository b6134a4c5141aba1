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
"""What pruning costs besides the layers it saves, counted on CPU: host syncs (data-dependent ops
that would make a GPU wait), the work a stage does when nothing exits, and recompiles under `torch.compile`."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import dtop_hf.modeling_dtop as modeling_dtop
from dtop_hf.pruning import ActiveTokens


# Ops whose result the host must read before it can go on (on a GPU: a device-to-host sync). `nonzero_static` is
# not one of them: its output size is given.
SYNCING_OPS = {
    "aten._local_scalar_dense.default",  # .item(), bool(tensor), int(tensor)
    "aten.is_nonzero.default",
    "aten.nonzero.default",
    "aten.equal.default",
    "aten.masked_select.default",
    "aten.unique_consecutive.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
}


class CountDataDependentOps(TorchDispatchMode):
    """Counts every aten op, and the ones that read device data back on the host: the ops above, indexing with a
    boolean mask (its output size is the mask's count), and `Tensor.tolist()` (which reads CPU memory without any
    aten op, so it is counted by wrapping the method)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.syncs = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.ops[name] += 1
        boolean_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            torch.is_tensor(index) and index.dtype == torch.bool for index in (args[1] if len(args) > 1 else ())
        )
        if name in SYNCING_OPS or boolean_index:
            self.syncs[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(model, pixel_values, monkeypatch, **kwargs) -> CountDataDependentOps:
    counter = CountDataDependentOps()
    original_tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        counter.syncs["Tensor.tolist"] += 1
        return original_tolist(tensor)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(torch.Tensor, "tolist", counted_tolist)
        with counter:
            model(pixel_values, **kwargs)
    return counter


@pytest.mark.parametrize("use_cls_token", [False, True])
def test_host_syncs_per_forward(model_tester, exit_thresholds, varied_images, head_type, use_cls_token, monkeypatch):
    model = model_tester(head_type=head_type, use_cls_token=use_cls_token).create_model()
    pixel_values = varied_images(3)
    thresholds = exit_thresholds(model, pixel_values)
    num_auxiliary = model.config.num_stages - 1

    # No stage prunes: no sync at all (input validation included).
    assert sum(count_ops(model, pixel_values, monkeypatch, exit_threshold=1.0).syncs.values()) == 0
    # Pruning: one sync per auxiliary stage (its new token counts), nothing per layer.
    pruning = count_ops(model, pixel_values, monkeypatch, exit_threshold=thresholds)
    assert pruning.syncs == Counter({"Tensor.tolist": num_auxiliary})
    # A stage with threshold 1.0 does not even look.
    assert count_ops(model, pixel_values, monkeypatch, exit_threshold=(thresholds[0], 1.0)).syncs == Counter(
        {"Tensor.tolist": 1}
    )


@pytest.mark.parametrize("use_cls_token", [False, True])
def test_capacity_mode_reads_nothing_back_and_packs_nothing(
    model_tester, varied_images, head_type, use_cls_token, monkeypatch
):
    model = model_tester(head_type=head_type, use_cls_token=use_cls_token).create_model()
    attention_masks = []
    build_attention_mask = modeling_dtop.build_attention_mask

    def recording_build_attention_mask(*args, **kwargs):
        attention_masks.append(build_attention_mask(*args, **kwargs))
        return attention_masks[-1]

    monkeypatch.setattr(modeling_dtop, "build_attention_mask", recording_build_attention_mask)
    counted = count_ops(model, varied_images(3), monkeypatch, exit_capacity=(0.5, 0.25))
    assert sum(counted.syncs.values()) == 0
    # Dense layouts: none of the variable-length packing's bookkeeping (positions of the active tokens), and every
    # layer (and ATM head) attends without a key mask: one mask per stage for its layers, one per ATM head.
    assert "aten.nonzero_static.default" not in counted.ops
    assert len(attention_masks) == (6 if head_type == "atm" else 3)
    assert all(mask is None for mask in attention_masks)
    # The rows that go on are moved whole (one row gather per pruning head, no element-wise gather of features).
    assert counted.ops["aten.index_select.default"] >= 2


def test_host_syncs_do_not_grow_with_the_layers(model_tester, varied_images, monkeypatch):
    pixel_values = varied_images(2)
    counts = []
    for num_layers in (4, 8):
        out_indices = (1, num_layers - 2, num_layers - 1)
        model = model_tester(num_hidden_layers=num_layers, out_indices=out_indices).create_model()
        counts.append(count_ops(model, pixel_values, monkeypatch, exit_threshold=0.2).syncs)
    assert counts[0] == counts[1] == Counter({"Tensor.tolist": 2})


def test_a_stage_where_nothing_exits_does_no_more_work_than_threshold_one(
    model_tester, exit_thresholds, varied_images, head_type, monkeypatch
):
    model = model_tester(head_type=head_type).create_model()
    pixel_values = varied_images(3)
    confidence_above_all = 0.999  # random heads: every confidence is far below
    unpruned = count_ops(model, pixel_values, monkeypatch, exit_threshold=1.0).ops
    nothing_exits = count_ops(model, pixel_values, monkeypatch, exit_threshold=confidence_above_all).ops
    # The exit rule runs (scores in float32, confidence, top-k), then the packing is kept as it is: no gather of
    # the hidden states, no new index, no padded layout, no mask.
    for op in ("aten.index_select.default", "aten.nonzero_static.default", "aten.index_copy.default"):
        assert nothing_exits[op] == unpruned[op], op
    extra = nothing_exits - unpruned
    assert not {op for op in extra if op.startswith(("aten.index", "aten.cat", "aten.nonzero"))}, extra


def test_no_copy_when_nothing_exits():
    tokens = ActiveTokens.all_active(2, (3, 3), num_prefix_tokens=1, num_stages=3, device=torch.device("cpu"))
    hidden_states = torch.randn(tokens.sequence.total, 4)
    nobody = torch.zeros(2, 9, dtype=torch.bool)
    same, same_hidden_states, _ = tokens.after_exit(nobody, 0, hidden_states)
    assert same is tokens and same_hidden_states is hidden_states
    assert tokens.after_exit(None, 0, hidden_states)[1] is hidden_states
    # Control: one exit does repack.
    one = nobody.clone()
    one[1, 4] = True
    repacked, repacked_hidden_states, _ = tokens.after_exit(one, 0, hidden_states)
    assert repacked_hidden_states.shape == (hidden_states.shape[0] - 1, 4)
    assert repacked.exit_stage[1, 4] == 0 and (repacked.exit_stage.flatten()[[*range(13), *range(14, 18)]] == 2).all()
    # The rows kept are the right ones: image 0 whole, image 1's prefix row (10), then its patches but patch 4 (15).
    assert torch.equal(repacked_hidden_states, hidden_states[[*range(15), *range(16, 20)]])


def test_torch_compile_does_not_recompile_for_new_token_counts(model_tester, exit_thresholds, varied_images):
    # The "eager" backend: recompiles are decided by dynamo's guards, whatever the backend; this keeps the test cheap.
    from torch._dynamo.utils import counters

    model = model_tester(head_num_layers=1).create_model()
    model.config.exit_threshold = exit_thresholds(model, varied_images(3))
    batches = [varied_images(3, seed=seed).flip(0) if seed % 2 else varied_images(3, seed=seed) for seed in range(6)]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    graphs_after_batch, token_counts = [], set()
    try:
        with torch.no_grad():
            for pixel_values in batches:
                outputs, expected = compiled(pixel_values), model(pixel_values)
                graphs_after_batch.append(counters["stats"]["unique_graphs"])
                token_counts.add(tuple(outputs.tokens_per_layer[:, -1].tolist()))
                assert torch.equal(outputs.exit_stage, expected.exit_stage)
                assert torch.equal(outputs.tokens_per_layer, expected.tokens_per_layer)
                torch.testing.assert_close(outputs.logits, expected.logits, rtol=0, atol=1e-6)
    finally:
        torch._dynamo.reset()
    assert len(token_counts) == len(batches)  # every batch had other token counts
    # Two batches warm up (the first change of each size makes it dynamic); after that, nothing new is compiled.
    assert graphs_after_batch[2:] == [graphs_after_batch[1]] * (len(batches) - 2), graphs_after_batch


# --- variable-length attention on the packed tokens -----------------------------------------------------------------


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
    """What `torch.nn.attention.varlen.varlen_attn` computes (a CUDA flash kernel), written with plain sdpa per
    sequence: packed `(total, heads, head_dim)` in, the same out; sequence i is rows `cu_seq[i]:cu_seq[i + 1]`."""
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
    starts = cu_seq_q.tolist()
    assert max_q == max_k == max(stop - start for start, stop in zip(starts[:-1], starts[1:]))
    outputs = [query.new_zeros(0, *query.shape[1:])]
    for start, stop in zip(starts[:-1], starts[1:]):
        sequence = [tensor[start:stop].transpose(0, 1) for tensor in (query, key, value)]  # (heads, length, head_dim)
        outputs.append(F.scaled_dot_product_attention(*sequence, scale=scale).transpose(0, 1))
    return torch.cat(outputs)


@pytest.mark.parametrize("use_cls_token", [False, True])
def test_varlen_attention_path_gives_the_padded_path_results(
    model_tester, exit_thresholds, varied_images, use_cls_token, monkeypatch
):
    # The kernel itself needs a CUDA GPU; this checks on CPU everything around it: the packed layout, the cumulative
    # lengths of images of different lengths (prefix tokens included), the scale.
    model = model_tester(use_cls_token=use_cls_token).create_model()
    pixel_values = varied_images(3)
    thresholds = exit_thresholds(model, pixel_values)
    with torch.no_grad():
        expected = model(pixel_values, exit_threshold=thresholds)
    calls = []

    def recording_varlen_attn(*args, **kwargs):
        calls.append(args[3].tolist())
        return reference_varlen_attn(*args, **kwargs)

    monkeypatch.setattr(modeling_dtop, "varlen_attn", recording_varlen_attn)
    monkeypatch.setattr(modeling_dtop, "use_varlen_attention", lambda query, implementation, dropout: True)
    with torch.no_grad():
        actual = model(pixel_values, exit_threshold=thresholds)
    assert len(calls) == model.config.num_hidden_layers
    assert len({tuple(call) for call in calls}) == 3  # the lengths change after each auxiliary head
    assert torch.equal(actual.exit_stage, expected.exit_stage)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=1e-5)


def test_varlen_attention_only_where_the_kernel_runs():
    query = torch.zeros(4, 2, 8, dtype=torch.bfloat16)
    # CPU: never (the flash kernel is CUDA-only); eager and attention dropout never either.
    assert not modeling_dtop.use_varlen_attention(query, "sdpa", 0.0)
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        cuda_query = query.cuda()
        assert modeling_dtop.use_varlen_attention(cuda_query, "sdpa", 0.0) == (modeling_dtop.varlen_attn is not None)
        assert not modeling_dtop.use_varlen_attention(cuda_query.float(), "sdpa", 0.0)
        assert not modeling_dtop.use_varlen_attention(cuda_query, "eager", 0.0)
        assert not modeling_dtop.use_varlen_attention(cuda_query, "sdpa", 0.1)
