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
"""`transformers.Trainer` as the semantic-segmentation guide uses it: a few training steps on a tiny DToP and an
in-memory `datasets.Dataset`, evaluation with the guide's `compute_metrics` (the package's `evaluate` mIoU instead
of the Hub's), only the logits kept for metrics, save and reload."""

import numpy as np
import pytest
import torch
from torch import nn


datasets = pytest.importorskip("datasets", reason="the Trainer test needs datasets (the `train` extras)")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the `train` extras)")

from transformers import EvalPrediction, Trainer, TrainingArguments  # noqa: E402

from dtop_hf import DToPForSemanticSegmentation, DToPImageProcessor  # noqa: E402
from dtop_hf.toolkit.data.synthetic_scenes import SYNTHETIC_ID2LABEL, make_synthetic_scenes  # noqa: E402
from dtop_hf.toolkit.evaluation.metrics import StreamingMeanIoU, load_mean_iou_metric  # noqa: E402


IMAGE_SIZE = 32
NUM_LABELS = len(SYNTHETIC_ID2LABEL)


def guide_compute_metrics(metric, num_labels: int, seen: list[EvalPrediction]):
    """The guide's `compute_metrics`, as written there (plus a note of what Trainer passed in)."""

    def compute_metrics(eval_pred):
        seen.append(eval_pred)
        with torch.no_grad():
            logits, labels = eval_pred
            logits_tensor = torch.from_numpy(logits)
            logits_tensor = nn.functional.interpolate(
                logits_tensor,
                size=labels.shape[-2:],
                mode="bilinear",
                align_corners=False,
            ).argmax(dim=1)

            pred_labels = logits_tensor.detach().cpu().numpy()
            metrics = metric.compute(
                predictions=pred_labels,
                references=labels,
                num_labels=num_labels,
                ignore_index=255,
                reduce_labels=False,
            )
            for key, value in metrics.items():
                if isinstance(value, np.ndarray):
                    metrics[key] = value.tolist()
            return metrics

    return compute_metrics


def transforms(image_processor: DToPImageProcessor):
    """The guide's `set_transform` function: images and label maps through the image processor."""

    def apply(example_batch):
        images = [image.convert("RGB") for image in example_batch["image"]]
        labels = list(example_batch["annotation"])
        return image_processor(images, segmentation_maps=labels, return_tensors="pt")

    return apply


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three Trainer steps on 6 synthetic scenes, then `trainer.evaluate` on 4 others, then `save_model`."""
    from conftest import DToPModelTester

    output_dir = tmp_path_factory.mktemp("trainer")
    # A low exit threshold: a model in training mode must still not prune (the config's
    # `prune_during_training` is off), while evaluation prunes as the config says.
    tester = DToPModelTester(
        num_labels=NUM_LABELS, id2label=dict(SYNTHETIC_ID2LABEL), exit_threshold=0.2, image_size=IMAGE_SIZE
    )
    model = tester.create_model().train()
    image_processor = DToPImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_reduce_labels=True)
    train_dataset = make_synthetic_scenes(6, image_size=IMAGE_SIZE, seed=0, split="train")
    eval_dataset = make_synthetic_scenes(4, image_size=IMAGE_SIZE, seed=0, split="validation")
    train_dataset.set_transform(transforms(image_processor))
    eval_dataset.set_transform(transforms(image_processor))

    exits_in_training = []

    def record_exits(module, inputs, outputs):
        if module.training:
            exits_in_training.append(int((outputs.exit_stage < module.config.num_stages - 1).sum()))

    model.register_forward_hook(record_exits)
    seen = []
    training_args = TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        learning_rate=1e-3,
        max_steps=3,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=3,  # 4 images: a full batch and a partial one
        remove_unused_columns=False,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=guide_compute_metrics(load_mean_iou_metric(), NUM_LABELS, seen),
    )
    train_output = trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(output_dir / "model"))
    image_processor.save_pretrained(str(output_dir / "model"))
    return {
        "trainer": trainer,
        "train_output": train_output,
        "metrics": metrics,
        "seen": seen,
        "exits_in_training": exits_in_training,
        "eval_dataset": eval_dataset,
        "folder": output_dir / "model",
    }


def test_trainer_trains_without_pruning(trained):
    assert trained["train_output"].global_step == 3
    assert np.isfinite(trained["train_output"].training_loss)
    assert len(trained["exits_in_training"]) == 3
    assert trained["exits_in_training"] == [0, 0, 0]  # no surprise pruning in training mode
    # Not for want of confident tokens: the same model and threshold prune in eval mode.
    model = trained["trainer"].model.eval()
    pixel_values = torch.stack([trained["eval_dataset"][index]["pixel_values"] for index in range(4)])
    with torch.no_grad():
        exit_stage = model(pixel_values).exit_stage
    assert bool((exit_stage < model.config.num_stages - 1).any())


def test_evaluation_keeps_only_the_logits(trained):
    (eval_pred,) = trained["seen"]
    # Not a tuple of logits, exit maps, token counts and per-stage outputs: the logits alone, one row per image.
    assert isinstance(eval_pred.predictions, np.ndarray)
    grid = IMAGE_SIZE // 4  # the tester's patch size
    assert eval_pred.predictions.shape == (4, NUM_LABELS, grid, grid)
    assert eval_pred.predictions.dtype == np.float32
    assert eval_pred.label_ids.shape == (4, IMAGE_SIZE, IMAGE_SIZE)
    # The memory kept is the logits' and nothing more.
    assert eval_pred.predictions.nbytes == 4 * NUM_LABELS * grid * grid * 4


def test_guide_metrics_equal_the_streaming_metric(trained):
    metrics = trained["metrics"]
    for key in ("eval_mean_iou", "eval_mean_accuracy", "eval_overall_accuracy", "eval_per_category_iou", "eval_loss"):
        assert key in metrics, key
    assert len(metrics["eval_per_category_iou"]) == NUM_LABELS
    (eval_pred,) = trained["seen"]
    logits = torch.from_numpy(eval_pred.predictions)
    labels = torch.from_numpy(eval_pred.label_ids)
    predictions = nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    streaming = StreamingMeanIoU(NUM_LABELS)
    streaming.update(predictions.argmax(dim=1), labels)
    assert metrics["eval_mean_iou"] == streaming.compute()["mean_iou"]
    assert metrics["eval_overall_accuracy"] == streaming.compute()["overall_accuracy"]


def test_saved_model_reloads_with_the_same_outputs(trained):
    model = trained["trainer"].model.eval()
    reloaded = DToPForSemanticSegmentation.from_pretrained(trained["folder"]).eval()
    pixel_values = torch.stack([trained["eval_dataset"][index]["pixel_values"] for index in range(2)])
    with torch.no_grad():
        expected, actual = model(pixel_values), reloaded(pixel_values)
    torch.testing.assert_close(actual.logits, expected.logits)
    assert torch.equal(actual.exit_stage, expected.exit_stage)
    assert DToPImageProcessor.from_pretrained(trained["folder"]).do_reduce_labels
