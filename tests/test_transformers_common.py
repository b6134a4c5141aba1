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
"""transformers' own `ModelTesterMixin` and `ConfigTester`, fetched from its PyPI sdist at test time, run on DToP.

The common tests are not part of the transformers wheel and may not be copied into this repository, so the
source distribution of the installed transformers version is downloaded once with pip (cached under
`~/.cache/dtop-hf-tests`, or `$DTOP_HF_TEST_CACHE`), its top-level `tests/*.py` are extracted next to three small
stubs for modules the sdist lacks (`STUBS`), and imported as the package `hf_common_tests`. Without network
access the whole module is skipped.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from conftest import DToPModelTester
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from dtop_hf import DToPConfig, DToPForSemanticSegmentation, DToPModel


CACHE_DIR = Path(os.environ.get("DTOP_HF_TEST_CACHE", "~/.cache/dtop-hf-tests")).expanduser()
PACKAGE_NAME = "hf_common_tests"

# Modules imported by the common test files that the sdist does not contain (it ships the top-level `tests/*.py`
# only, not `tests/exporters/`, `tests/generation/`, `tests/utils/`): small stand-ins are enough to import them.
STUBS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n'
        '    "output_hidden_states": True,\n'
        '    "output_attentions": True,\n'
        '    "dtype": "float16",\n'
        '    "chunk_size_feed_forward": 5,\n'
        '    "architectures": ["BertModel"],\n'
        '    "id2label": {0: "label"},\n'
        '    "label2id": {"label": "0"},\n'
        '    "problem_type": "regression",\n'
        "}\n"
    ),
}


def download_sdist(version: str) -> Path:
    """The transformers sdist of `version` in the cache (pip download on the first call)."""
    sdist = CACHE_DIR / f"transformers-{version}.tar.gz"
    if sdist.exists():
        return sdist
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet"]
    # pip prepares the sdist's metadata; reusing the installed setuptools (no isolated build env) takes 5 s
    # instead of 30 s. Fall back to the isolated build where setuptools is missing.
    for extra in (["--no-build-isolation"], []):
        command = base + extra + [f"transformers=={version}", "-d", str(CACHE_DIR)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode == 0 and sdist.exists():
            return sdist
    raise RuntimeError(f"`pip download transformers=={version}` failed: {result.stderr.strip()[-500:]}")


def extract_common_tests(version: str) -> Path:
    """A folder holding the package `hf_common_tests` (top-level `tests/*.py` of the sdist plus the stubs)."""
    root = CACHE_DIR / f"transformers-{version}-common-tests"
    if (root / PACKAGE_NAME / "test_modeling_common.py").exists():
        return root
    sdist = download_sdist(version)
    staging = Path(tempfile.mkdtemp(dir=CACHE_DIR))
    package = staging / PACKAGE_NAME
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            relative = member.name[len(prefix) :] if member.name.startswith(prefix) else ""
            if member.isfile() and relative.endswith(".py") and "/" not in relative:
                member.name = relative
                archive.extract(member, package, filter="data")
    for relative_path, text in STUBS.items():
        stub = package / relative_path
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text(text)
    for folder in {package, *((package / path).parent for path in STUBS)}:
        (folder / "__init__.py").touch()
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)  # atomic: a half-extracted folder is never used
    return root


try:
    sys.path.insert(0, str(extract_common_tests(transformers.__version__)))
    from hf_common_tests.test_configuration_common import ConfigTester
    from hf_common_tests.test_modeling_common import ModelTesterMixin
except Exception as error:  # no network, no pip, or a sdist without the expected files
    pytest.skip(f"transformers' common tests are unavailable: {error}", allow_module_level=True)


class DToPCommonModelTester(DToPModelTester):
    """The mixin wants at most 2 layers (`test_num_layers_is_small`): one auxiliary head after layer 0, the decode
    head after layer 1.

    The common tests build models with their own random weights, so the threshold cannot be tuned to a model. With
    the default initialisation every ATM confidence is about 0.27 (presence ~0.5 x sigmoid ~0.5), so threshold 0.2
    makes every token a candidate and all but the `keep_top_k` best of each predicted class exit after the
    auxiliary head: every common test runs with pruning on (the decode head sees a few tokens per image).
    """

    def __init__(self, parent, **kwargs):
        defaults = dict(
            batch_size=3,
            image_size=16,
            num_hidden_layers=2,
            out_indices=(0, 1),
            head_num_layers=1,
            exit_threshold=0.2,
            keep_top_k=2,
            # The training tests prune too (the default keeps training mode unpruned).
            prune_during_training=True,
        )
        super().__init__(parent, **{**defaults, **kwargs})


class DToPModelCommonTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (DToPModel, DToPForSemanticSegmentation)
    # DToP has no token embedding matrix to resize.
    test_resize_embeddings = False
    # transformers' exporter tests (`ExportTesterMixin`) are not among those run here (a stand-in above); DToP's
    # export, threshold and capacity mode, is tested in tests/test_onnx_export.py.
    test_torch_exportable = False
    has_attentions = True

    @classmethod
    def setUpClass(cls):
        # The mixin recognises base models (no loss: skipped by the training tests) through transformers' static
        # table of model types; list DToPModel there for the time of these tests, as `dtop_hf` does for the
        # semantic-segmentation table.
        cls.base_model_table = mock.patch.dict(MODEL_MAPPING_NAMES, {DToPConfig.model_type: "DToPModel"})
        cls.base_model_table.start()

    @classmethod
    def tearDownClass(cls):
        cls.base_model_table.stop()

    def setUp(self):
        self.model_tester = DToPCommonModelTester(self)
        self.config_tester = ConfigTester(self, config_class=DToPConfig, has_text_modality=False, common_properties=[])

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        # The mixin adds segmentation labels only for classes in transformers' static mapping; add them (random
        # ids, so that every head's mask loss has present classes) for ours.
        if return_labels and model_class is DToPForSemanticSegmentation:
            batch_size, _, height, width = inputs_dict["pixel_values"].shape
            generator = torch.Generator().manual_seed(0)
            labels = torch.randint(0, self.model_tester.num_labels, (batch_size, height, width), generator=generator)
            inputs_dict["labels"] = labels.to(inputs_dict["pixel_values"].device)
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="DToP's input embedding is a Conv2d patch projection, the test expects an nn.Embedding.")
    def test_model_get_set_embeddings(self):
        pass
