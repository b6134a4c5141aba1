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
"""The GPU path, on a CUDA device only: the variable-length flash attention on the packed tokens
against the padded sdpa path, and the host syncs of a forward pass counted by CUDA's sync debug mode."""

import warnings

import pytest
import torch

import dtop_hf.modeling_dtop as modeling_dtop
from dtop_hf.pruning import pack_tokens


pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="needs a CUDA GPU of compute capability >= 8.0 (the flash kernel of varlen_attn)",
)

# bf16 keeps 8 bits of mantissa: two attention kernels (flash varlen vs sdpa on the padded layout) round differently.
# Outputs here are O(1); measured differences are expected around 1e-2 at most.
BF16_ATOL = BF16_RTOL = 2e-2


@pytest.mark.skipif(modeling_dtop.varlen_attn is None, reason="torch.nn.attention.varlen is not in this torch")
def test_varlen_attention_equals_the_padded_sdpa_path_in_bf16(model_tester, monkeypatch):
    config = model_tester(hidden_size=128, num_attention_heads=2).get_config()
    attention = modeling_dtop.DToPAttention(config).cuda().to(torch.bfloat16).eval()
    exit_rates = torch.tensor([[0.1], [0.5], [0.7], [0.0]])  # images of different lengths
    active_mask = torch.rand(4, 100, generator=torch.Generator().manual_seed(0)) > exit_rates
    packing = pack_tokens(active_mask.cuda())
    hidden_states = torch.randn(packing.total, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    mask = modeling_dtop.build_attention_mask(packing, "sdpa", hidden_states.dtype)
    with torch.no_grad():
        assert modeling_dtop.use_varlen_attention(hidden_states[:, None], "sdpa", 0.0)
        varlen_output, _ = attention(hidden_states, packing, mask)
        monkeypatch.setattr(modeling_dtop, "use_varlen_attention", lambda *args: False)
        padded_output, _ = attention(hidden_states, packing, mask)
    torch.testing.assert_close(varlen_output, padded_output, rtol=BF16_RTOL, atol=BF16_ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_syncs_on_the_device(model_tester, varied_images, dtype):
    model = model_tester(keep_top_k=2).create_model().cuda()
    pixel_values = varied_images(4).cuda()
    num_auxiliary = model.config.num_stages - 1

    def syncs(exit_threshold) -> int:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught, torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(pixel_values, exit_threshold=exit_threshold)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(warning.message) for warning in caught)

    syncs(1.0)  # warm-up: lazy initialisations may sync once
    assert syncs(1.0) == 0
    assert syncs(0.2) <= num_auxiliary  # one per auxiliary stage (the new token counts), none per layer
