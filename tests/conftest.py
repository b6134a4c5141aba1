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
"""Shared test helpers: a tiny-model builder (`DToPModelTester`) and thresholds that make tokens exit for sure."""

import os


# Everything is built locally: never reach for the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import runpy  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from dtop_hf import DToPConfig, DToPForSemanticSegmentation  # noqa: E402
from dtop_hf.modeling_dtop import DTOP_HEAD_CLASSES  # noqa: E402


# The models here are tiny: one thread is faster, and on a busy 2-core machine several threads spinning on
# millisecond-sized ops make every forward ~50x slower.
torch.set_num_threads(1)

# Markers used by transformers' common test files (tests/test_transformers_common.py imports them).
TRANSFORMERS_TEST_MARKERS = (
    "accelerate_tests",
    "flash_attn_test",
    "flash_attn_3_test",
    "flash_attn_4_test",
    "torch_compile_test",
    "slow",
    "is_staging_test",
)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, argv: list[str]):
    """Run `examples/<name>.py` in this process, as `python examples/<name>.py *argv` would, and return what its
    `main(argv)` returns. The script runs from its file: the scripts are no package, and nothing imports them."""
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"example_{name}")["main"](argv)


def load_example(name: str):
    """The namespace of `examples/<name>.py`, for the tests that still call a script's helpers other than `main`
    (`tests/test_presets.py`); use [`run_example`] for anything else."""
    return types.SimpleNamespace(**runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"example_{name}"))


def pytest_configure(config):
    for marker in TRANSFORMERS_TEST_MARKERS:
        config.addinivalue_line("markers", f"{marker}: marker of transformers' own test suite")


# Thresholds are placed at least this far from every token confidence, so that float noise (batching, sdpa vs
# eager: ~1e-7 here) cannot flip an exit decision and make two runs that should agree differ for that reason.
MIN_THRESHOLD_MARGIN = 1e-5


class DToPModelTester:
    """Tiny DToP configs and inputs, in the manner of transformers' `*ModelTester` classes.

    The defaults give a 4-layer backbone on 32x32 images with 4x4 patches (an 8x8 token grid) and heads after
    layers 1, 2 and 3: two auxiliary heads that can prune, and the decode head. Every keyword that is not an
    attribute below goes straight into the config.
    """

    def __init__(
        self,
        parent=None,
        batch_size: int = 2,
        image_size: int = 32,
        patch_size: int = 4,
        num_channels: int = 3,
        hidden_size: int = 32,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 64,
        out_indices: tuple[int, ...] | None = None,
        head_type: str = "atm",
        head_hidden_size: int = 16,
        head_num_attention_heads: int = 2,
        head_num_layers: int = 2,
        num_labels: int = 5,
        exit_threshold: float | tuple[float, ...] = 0.9,
        keep_top_k: int = 2,
        is_training: bool = True,
        **config_overrides,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        # Up to three heads, the last one after the last layer.
        self.out_indices = tuple(out_indices or range(max(num_hidden_layers - 3, 0), num_hidden_layers))
        self.head_type = head_type
        self.head_hidden_size = head_hidden_size
        self.head_num_attention_heads = head_num_attention_heads
        self.head_num_layers = head_num_layers
        self.num_labels = num_labels
        self.exit_threshold = exit_threshold
        self.keep_top_k = keep_top_k
        self.is_training = is_training
        self.config_overrides = config_overrides
        # Tokens per image on the grid (the class token, off by default, is not part of the outputs).
        grid_side = -(-image_size // patch_size)
        self.seq_length = grid_side * grid_side

    def get_config(self) -> DToPConfig:
        return DToPConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            out_indices=self.out_indices,
            head_type=self.head_type,
            head_hidden_size=self.head_hidden_size,
            head_num_attention_heads=self.head_num_attention_heads,
            head_num_layers=self.head_num_layers,
            num_labels=self.num_labels,
            exit_threshold=self.exit_threshold,
            keep_top_k=self.keep_top_k,
            **self.config_overrides,
        )

    def prepare_config_and_inputs(self, seed: int = 0) -> tuple[DToPConfig, torch.Tensor, torch.Tensor]:
        """A config, `pixel_values` `(batch, channels, image_size, image_size)` and labels `(batch, H, W)`."""
        generator = torch.Generator().manual_seed(seed)
        shape = (self.batch_size, self.num_channels, self.image_size, self.image_size)
        pixel_values = torch.randn(shape, generator=generator)
        labels = torch.randint(
            0, self.num_labels, (self.batch_size, self.image_size, self.image_size), generator=generator
        )
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self) -> tuple[DToPConfig, dict]:
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}

    def create_model(self, model_class: type = DToPForSemanticSegmentation, seed: int = 0) -> torch.nn.Module:
        """A randomly initialised model in eval mode; the same `seed` gives the same weights."""
        torch.manual_seed(seed)
        return model_class(self.get_config()).eval()


def token_confidence_of_stage(outputs, stage: int, head_type: str) -> torch.Tensor:
    """`(batch, tokens)` top class score of head `stage` as the pruning rule sees it (FCN logits -> softmax)."""
    scores = DTOP_HEAD_CLASSES[head_type].scores_to_probabilities(outputs.stage_logits[stage])
    return scores.amax(dim=1).flatten(1)


def threshold_in_widest_gap(confidence: torch.Tensor, exit_fraction: float = 0.5) -> float:
    """A threshold about `exit_fraction` of `confidence` lies above, at the middle of the widest gap near there.

    Args:
        confidence: 1-D float tensor of token confidences.
        exit_fraction: wanted share of tokens strictly above the threshold.
    """
    values = confidence.double().flatten().sort().values
    num_values = values.numel()
    quantile_position = int(round((1.0 - exit_fraction) * (num_values - 1)))
    low = max(quantile_position - max(num_values // 6, 1), 0)
    high = min(quantile_position + max(num_values // 6, 1), num_values - 1)
    window = values[low : high + 1]
    gaps = window[1:] - window[:-1]
    widest = int(gaps.argmax())
    if gaps[widest] < 2 * MIN_THRESHOLD_MARGIN:
        raise RuntimeError(f"No gap of at least {2 * MIN_THRESHOLD_MARGIN} between confidences near the quantile.")
    return float((window[widest] + window[widest + 1]) / 2)


@torch.no_grad()
def pruning_thresholds(model: torch.nn.Module, pixel_values: torch.Tensor, exit_fraction: float = 0.5) -> tuple:
    """One exit threshold per auxiliary head that makes about `exit_fraction` of the still-active tokens exit
    candidates at every auxiliary head, for this model and batch (random weights give confidences that all sit
    near 0.27 for ATM and 0.2-0.25 for FCN, so the config's 0.9 would prune nothing).

    Each threshold sits in a gap between token confidences at least `2 * MIN_THRESHOLD_MARGIN` wide, so that
    runs of the same images alone, in other batches or with another attention implementation take the same exit
    decisions. Computed head by head: head k's confidences depend on what exited before it.
    """
    config = model.config
    num_auxiliary = len(config.out_indices) - 1
    thresholds = []
    for stage in range(num_auxiliary):
        override = tuple(thresholds) + (1.0,) * (num_auxiliary - stage)
        outputs = model(pixel_values, exit_threshold=override)
        confidence = token_confidence_of_stage(outputs, stage, config.head_type)
        still_active = outputs.exit_stage.flatten(1) >= stage
        thresholds.append(threshold_in_widest_gap(confidence[still_active], exit_fraction))
    return tuple(thresholds)


def images_that_prune_differently(batch_size: int = 2, image_size: int = 32, seed: int = 0) -> torch.Tensor:
    """`(batch, 3, image_size, image_size)`: noise of growing amplitude on a smooth ramp per image, so that the
    images of a batch are unlike each other and, with one threshold, let different numbers of tokens exit."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1.0, 1.0, image_size)
    images = []
    for index in range(batch_size):
        noise = torch.randn(3, image_size, image_size, generator=generator) * (0.25 + index)
        images.append(noise + (index - 0.5) * ramp[None, :, None] + 0.3 * ramp[None, None, :])
    return torch.stack(images)


def run_without_dtop_hf(script: str, arguments: list, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `python -I -c script *arguments` in a fresh interpreter, outside the repository, offline, with an empty
    Hugging Face cache and no PYTHON* / HF_* / TRANSFORMERS_* variables (the script itself must block `dtop_hf`:
    an editable install stays importable even under `-I`). Fails the test when the script fails."""
    working_dir = tmp_path / "elsewhere"
    working_dir.mkdir(exist_ok=True)
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))
    }
    environment.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-I", "-c", script, *map(str, arguments)],
        cwd=working_dir, env=environment, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


@pytest.fixture(params=["atm", "fcn"])
def head_type(request) -> str:
    """Runs a test once per head type."""
    return request.param


@pytest.fixture
def model_tester() -> type[DToPModelTester]:
    """The tester class: `model_tester(head_type="fcn", num_labels=3).create_model()`."""
    return DToPModelTester


@pytest.fixture
def exit_thresholds():
    """`exit_thresholds(model, pixel_values, exit_fraction=0.5)` -> one safe threshold per auxiliary head."""
    return pruning_thresholds


@pytest.fixture
def varied_images():
    """`varied_images(batch_size=2, image_size=32, seed=0)` -> images that prune differently."""
    return images_that_prune_differently
