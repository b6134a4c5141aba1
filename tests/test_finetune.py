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
"""Tests of the fine-tuning stack: training helpers, data checks and transforms, and `examples/finetune.py`
run in two CPU processes (checkpoint, exact resume, distributed evaluation, pipeline loading, prune stage)."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import run_example
from PIL import Image

from dtop_hf import DToPForSemanticSegmentation, DToPImageProcessor
from dtop_hf.toolkit.data.datasets import (
    SegmentationDataset,
    check_segmentation_split,
    collate_segmentation_batch,
    load_segmentation_dataset,
    reduce_labels,
    standardize_columns,
)
from dtop_hf.toolkit.data.transforms import SegmentationEvalTransform, SegmentationTrainTransform
from dtop_hf.toolkit.training import build_training_dataloaders, preset_defaults
from dtop_hf.toolkit.training.checkpoints import checkpoint_step, find_latest_checkpoint, write_manifest
from dtop_hf.toolkit.training.config_overrides import build_preset_config, parse_config_overrides
from dtop_hf.toolkit.training.optimization import build_optimizer, build_poly_scheduler, set_train_scope


REPO_ROOT = Path(__file__).resolve().parents[1]
FINETUNE_SCRIPT = REPO_ROOT / "examples" / "finetune.py"
TINY_OVERRIDES = (
    "hidden_size=32,num_hidden_layers=4,num_attention_heads=2,intermediate_size=64,patch_size=4,"
    "head_hidden_size=16,head_num_attention_heads=2,head_num_layers=1,out_indices=[1,2,3]"
)


def tiny_model(**fields) -> DToPForSemanticSegmentation:
    torch.manual_seed(0)
    config = build_preset_config(
        parse_config_overrides(TINY_OVERRIDES), {0: "a", 1: "b", 2: "c"}, image_size=32, **fields
    )
    return DToPForSemanticSegmentation(config)


# ---------------------------------------------------------------------------------------------------------------
# Training helpers


def test_parse_config_overrides_accepts_lists_bools_none_and_strings():
    overrides = parse_config_overrides(
        "hidden_size=64, num_hidden_layers=4,num_attention_heads=4,image_size=64,out_indices=[1,2,3],"
        "exit_threshold=[0.9,0.95],"
        "head_type=fcn,use_cls_token=true,head_intermediate_size=None,layer_norm_eps=1e-5,hidden_act='gelu'"
    )
    assert overrides == {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": 64,
        "out_indices": [1, 2, 3],
        "exit_threshold": [0.9, 0.95],
        "head_type": "fcn",
        "use_cls_token": True,
        "head_intermediate_size": None,
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu",
    }
    config = build_preset_config(
        {
            key: overrides[key]
            for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "out_indices", "exit_threshold")
        }
    )
    assert config.out_indices == (1, 2, 3) and config.exit_thresholds_per_head() == (0.9, 0.95, 1.0)


@pytest.mark.parametrize("text, message", [("hidden_size", "name=value"), ("image_size=1,image_size=2", "twice")])
def test_parse_config_overrides_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_config_overrides(text)


def test_preset_rejects_unknown_fields_and_keeps_heads_valid():
    with pytest.raises(ValueError, match="hidden_size"):  # the closest field is suggested
        build_preset_config({"hiden_size": 64})
    # Changing the depth alone moves the heads so that the last one stays after the last layer.
    assert build_preset_config({"num_hidden_layers": 12}).out_indices == (5, 7, 11)


def test_poly_scheduler_warms_up_then_decays_to_zero():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = build_poly_scheduler(optimizer, num_warmup_steps=10, num_training_steps=100)
    learning_rates = []
    for _ in range(101):
        learning_rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert learning_rates[0] == pytest.approx(1e-6)
    assert learning_rates[5] == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert learning_rates[10] == pytest.approx(1.0)
    assert all(later < earlier for earlier, later in zip(learning_rates[10:100], learning_rates[11:100]))
    assert learning_rates[55] == pytest.approx(0.5**0.9)
    assert learning_rates[100] == 0.0


def test_optimizer_puts_heads_at_ten_times_the_learning_rate():
    model = tiny_model()
    optimizer = build_optimizer(model, learning_rate=1e-4, head_lr_multiplier=10.0, weight_decay=0.01)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["heads"]["lr"] == pytest.approx(1e-3)
    head_ids = {id(parameter) for parameter in model.dtop.heads.parameters()}
    assert {id(parameter) for parameter in groups["heads"]["params"]} == head_ids
    grouped = [id(parameter) for group in optimizer.param_groups for parameter in group["params"]]
    assert sorted(grouped) == sorted(id(parameter) for parameter in model.parameters())  # each parameter once


def test_heads_scope_freezes_the_backbone():
    model = tiny_model()
    set_train_scope(model, "heads")
    optimizer = build_optimizer(model, learning_rate=1e-4)
    assert [group["name"] for group in optimizer.param_groups] == ["heads"]
    assert not any(parameter.requires_grad for parameter in model.dtop.layers.parameters())
    assert not model.dtop.embeddings.patch_embeddings.projection.weight.requires_grad
    assert all(parameter.requires_grad for parameter in model.dtop.heads.parameters())
    with pytest.raises(ValueError, match="train_scope"):
        set_train_scope(model, "backbone")


def test_checkpoint_folders(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    for step in (2, 10, 4):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / "model.safetensors").write_bytes(b"weights")
        write_manifest(tmp_path / f"step_{step}", step)
    (tmp_path / "runs").mkdir()
    (tmp_path / "step_12").mkdir()  # no manifest: an interrupted save, skipped
    assert find_latest_checkpoint(tmp_path).name == "step_10"
    assert checkpoint_step(tmp_path / "step_4") == 4
    with pytest.raises(ValueError, match="step_N"):
        checkpoint_step(tmp_path / "runs")


# ---------------------------------------------------------------------------------------------------------------
# Data


def write_folder_dataset(root: Path, num_images: int = 4, size: int = 16) -> None:
    """`root/images/img_k.png` + `root/annotations/img_k.png`, labels 0..3 (0 = unlabelled), and id2label.json."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    for index in range(num_images):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            root / "images" / f"img_{index}.png"
        )
        Image.fromarray(rng.integers(0, 4, (size, size), dtype=np.uint8)).save(
            root / "annotations" / f"img_{index}.png"
        )
    (root / "id2label.json").write_text(json.dumps({"0": "road", "1": "sky", "2": "tree"}))


def test_folder_dataset_loads_and_checks(tmp_path):
    write_folder_dataset(tmp_path / "data", num_images=8)
    dataset, id2label = load_segmentation_dataset(str(tmp_path / "data"), validation_split_percentage=25)
    assert id2label == {0: "road", 1: "sky", 2: "tree"}
    assert (len(dataset["train"]), len(dataset["validation"])) == (6, 2)
    checked, report = check_segmentation_split(dataset["train"], "train", len(id2label), do_reduce_labels=True)
    assert len(checked) == 6 and report.num_skipped == 0


def test_label_out_of_range_names_the_sample(tmp_path):
    write_folder_dataset(tmp_path / "data")
    Image.fromarray(np.full((16, 16), 9, dtype=np.uint8)).save(tmp_path / "data" / "annotations" / "img_2.png")
    dataset, id2label = load_segmentation_dataset(str(tmp_path / "data"), validation_split_percentage=25)
    split = datasets.concatenate_datasets([dataset["train"], dataset["validation"]])
    with pytest.raises(ValueError, match=r"img_2\.png.*label values \[8\] after label reduction outside \[0, 3\)"):
        check_segmentation_split(split, "train", len(id2label), do_reduce_labels=True)
    # Unchecked data fails at the sample, with its name, not deep inside a batch.
    unchecked = SegmentationDataset(split, SegmentationEvalTransform(DToPImageProcessor()), 3, do_reduce_labels=True)
    bad_index = next(index for index in range(len(split)) if "img_2" in split[index]["image"].filename)
    with pytest.raises(ValueError, match=r"img_2\.png"):
        unchecked[bad_index]


def test_corrupt_and_unlabelled_images_are_skipped_and_counted(tmp_path):
    write_folder_dataset(tmp_path / "data", num_images=6)
    (tmp_path / "data" / "images" / "img_1.png").write_bytes(b"not a png at all")
    (tmp_path / "data" / "annotations" / "img_4.png").unlink()  # an image without a label map
    dataset, id2label = load_segmentation_dataset(str(tmp_path / "data"), validation_split_percentage=20)
    split = datasets.concatenate_datasets([dataset["train"], dataset["validation"]])
    assert len(split) == 5  # img_4 was dropped when pairing the files
    checked, report = check_segmentation_split(split, "train", len(id2label), do_reduce_labels=True)
    assert len(checked) == 4 and report.num_checked == 5
    assert len(report.corrupt) == 1 and "img_1.png" in report.corrupt[0]


def test_image_without_label_in_a_dataset_is_skipped():
    image = Image.new("RGB", (8, 8))
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    split = datasets.Dataset.from_dict(
        {"image": [image, image], "annotation": [Image.new("L", (8, 8)), None]}, features=features
    )
    checked, report = check_segmentation_split(split, "train", num_labels=3, do_reduce_labels=True)
    assert len(checked) == 1 and report.unlabelled == ["train[1]"]


def test_missing_columns_error_lists_the_columns_found():
    split = datasets.Dataset.from_dict({"photo": [Image.new("RGB", (4, 4))], "caption": ["x"]})
    with pytest.raises(ValueError, match=r"columns \['photo', 'caption'\].*--image_column_name"):
        standardize_columns(datasets.DatasetDict({"train": split}))
    renamed = standardize_columns(
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"pixel_values": [1], "label": [2], "extra": [3]})})
    )
    assert renamed["train"].column_names == ["image", "annotation", "extra"]


def test_reduce_labels_follows_mmseg():
    labels = np.array([[0, 1, 2], [150, 255, 3]], dtype=np.uint8)
    assert reduce_labels(labels).tolist() == [[255, 0, 1], [149, 255, 2]]


def test_train_transform_keeps_image_and_labels_aligned():
    """Four vertical stripes whose grey level encodes the label: after resize, crop, flip and padding the
    label map must still sit under the matching pixels (a flip or crop applied to one side only breaks this)."""
    stripe = np.repeat(np.arange(4), 16)[None, :].repeat(64, axis=0)  # (64, 64) labels 0..3
    image = Image.fromarray(np.repeat((stripe * 60 + 20).astype(np.uint8)[..., None], 3, axis=2))
    processor = DToPImageProcessor()
    transform = SegmentationTrainTransform(processor, crop_size=48, photometric_distortion=False)
    mean, std = np.array(processor.image_mean)[:, None, None], np.array(processor.image_std)[:, None, None]
    flipped_seen, padded_seen = set(), False
    for seed in range(12):
        pixel_values, labels = transform(image, stripe.copy(), np.random.default_rng(seed))
        assert pixel_values.shape == (3, 48, 48) and labels.shape == (48, 48)
        grey = (pixel_values * std + mean)[0] * 255
        decoded = np.clip(np.rint((grey - 20) / 60), 0, 3)
        labelled = labels != 255
        padded_seen |= bool((~labelled).any())
        assert np.all(pixel_values[:, ~labelled] == 0)  # padding: mean colour, ignored labels
        # Bilinear resizing blends the images at stripe edges: compare away from them.
        interior = labelled & (np.abs(np.diff(labels, axis=1, prepend=labels[:, :1])) == 0)
        interior &= np.abs(np.diff(labels, axis=1, append=labels[:, -1:])) == 0
        assert (decoded[interior] == labels[interior]).mean() > 0.97
        columns = labels[0][labels[0] != 255]
        flipped_seen.add(bool(columns[0] > columns[-1]))
    assert flipped_seen == {True, False} and padded_seen


def test_train_transform_is_deterministic_per_sample_and_epoch():
    dataset = load_segmentation_dataset(None, num_train_samples=2, num_validation_samples=1, image_size=32)[0]["train"]
    transform = SegmentationTrainTransform(DToPImageProcessor(), crop_size=32)
    first, second = (SegmentationDataset(dataset, transform, 15, True, seed=3) for _ in range(2))
    assert torch.equal(first[1]["pixel_values"], second[1]["pixel_values"])
    second.set_epoch(1)
    assert not torch.equal(first[1]["pixel_values"], second[1]["pixel_values"])


def test_collate_pads_images_and_labels():
    samples = [
        {"pixel_values": torch.ones(3, 4, 6), "labels": torch.zeros(5, 7, dtype=torch.long)},
        {"pixel_values": torch.ones(3, 6, 4), "labels": torch.ones(7, 5, dtype=torch.long)},
    ]
    batch = collate_segmentation_batch(samples)
    assert batch["pixel_values"].shape == (2, 3, 6, 6) and batch["labels"].shape == (2, 7, 7)
    assert batch["image_sizes"].tolist() == [[4, 6], [6, 4]] and batch["label_sizes"].tolist() == [[5, 7], [7, 5]]
    assert batch["pixel_values"][0, :, 4:].abs().sum() == 0 and (batch["labels"][1, :, 5:] == 255).all()


# ---------------------------------------------------------------------------------------------------------------
# examples/finetune.py in two CPU processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_finetune(output_dir: Path, *arguments: str, num_processes: int = 2) -> str:
    """Run the script through `accelerate launch` on CPU; returns its output (stdout + stderr)."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes > 1:
        command += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    else:
        command += ["--num_processes", "1"]
    command += [str(FINETUNE_SCRIPT), "--device", "cpu", "--output_dir", str(output_dir), *arguments]
    # One thread per process: two processes on two cores, no OpenMP oversubscription.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    return output


TINY_RUN = (
    "--synthetic_image_size", "32", "--synthetic_train_samples", "12", "--synthetic_validation_samples", "5",
    "--config_overrides", TINY_OVERRIDES, "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "1",
    "--learning_rate", "1e-3", "--num_warmup_steps", "2", "--max_train_steps", "6", "--checkpointing_steps", "2",
    "--seed", "7",
)  # fmt: skip


def read_losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "train_log.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory):
    """An uninterrupted 6-step run, and a run resumed from its step-4 checkpoint (the state a run killed after
    step 4 would have left), both in two processes. 12 images, 2 per process: 3 steps per epoch, so the resume
    point lies inside an epoch."""
    root = tmp_path_factory.mktemp("finetune")
    full, resumed = root / "full", root / "resumed"
    full_output = run_finetune(full, *TINY_RUN)
    resumed.mkdir()
    shutil.copytree(full / "step_4", resumed / "step_4")
    resumed_output = run_finetune(resumed, *TINY_RUN, "--resume_from_checkpoint", "latest")
    return {"full": full, "resumed": resumed, "full_output": full_output, "resumed_output": resumed_output}


def test_two_processes_checkpoint_and_resume_exactly(finetune_runs):
    for output in (finetune_runs["full_output"], finetune_runs["resumed_output"]):
        assert "process 0 of world size 2" in output and "process 1 of world size 2" in output
    assert sorted(path.name for path in finetune_runs["full"].glob("step_*")) == ["step_2", "step_4", "step_6"]
    assert (
        "Resumed from" in finetune_runs["resumed_output"]
        and "step 4, epoch 1, skipping 1 batches" in finetune_runs["resumed_output"]
    )
    full_losses, resumed_losses = read_losses(finetune_runs["full"]), read_losses(finetune_runs["resumed"])
    assert sorted(full_losses) == [1, 2, 3, 4, 5, 6] and sorted(resumed_losses) == [5, 6]
    # Same data order, augmentation, dropout draws, weights, optimiser and schedule: the curve continues exactly.
    assert resumed_losses == {step: full_losses[step] for step in (5, 6)}
    assert full_losses[6] < full_losses[1]  # and it does learn
    full_results = json.loads((finetune_runs["full"] / "all_results.json").read_text())
    resumed_results = json.loads((finetune_runs["resumed"] / "all_results.json").read_text())
    assert full_results["num_processes"] == 2 and full_results["train_steps"] == 6
    assert resumed_results["eval_mean_iou"] == full_results["eval_mean_iou"]


def test_distributed_evaluation_equals_single_process(finetune_runs):
    """The 2-process final evaluation (5 images, one per batch: process 1 gets a repeated sample to even out the
    shards) must equal a 1-process evaluation of the saved model on the same data. One image per batch keeps
    the arithmetic of every image identical: a barely trained model has near-tied class scores, whose argmax
    float rounding in another batch shape could flip."""
    from accelerate import Accelerator

    from dtop_hf.toolkit.evaluation.loop import evaluate_model

    model = DToPForSemanticSegmentation.from_pretrained(finetune_runs["full"])
    processor = DToPImageProcessor.from_pretrained(finetune_runs["full"])
    dataset, _ = load_segmentation_dataset(None, num_train_samples=12, num_validation_samples=5, image_size=32)
    _, eval_dataloader = build_training_dataloaders(
        dataset, processor, model.config.num_labels, crop_size=32, per_device_train_batch_size=2,
        per_device_eval_batch_size=1, seed=7,
    )  # TINY_RUN's batches and seed  # fmt: skip
    accelerator = Accelerator(cpu=True)
    eval_dataloader = accelerator.prepare(eval_dataloader)
    results = evaluate_model(model, eval_dataloader, accelerator, image_processor=processor)
    distributed = json.loads((finetune_runs["full"] / "all_results.json").read_text())
    assert results["num_images"] == distributed["eval_num_images"] == 5
    assert results["mean_iou"] == pytest.approx(distributed["eval_mean_iou"], abs=1e-12)
    assert results["gflops"] == pytest.approx(distributed["eval_gflops"], rel=1e-9)
    assert results["exit_share"] == pytest.approx(distributed["eval_exit_share"], abs=1e-12)


def test_final_model_loads_in_pipeline(finetune_runs):
    from transformers import pipeline

    folder = finetune_runs["full"]
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "all_results.json", "README.md"):
        assert (folder / name).is_file(), name
    segmenter = pipeline("image-segmentation", model=str(folder), trust_remote_code=True)
    image = load_segmentation_dataset(None, num_train_samples=1, num_validation_samples=1, image_size=32)[0][
        "validation"
    ][0]["image"]
    segments = segmenter(image)
    id2label = segmenter.model.config.id2label
    assert segments and all(segment["label"] in id2label.values() for segment in segments)
    assert all(segment["mask"].size == image.size for segment in segments)
    assert segmenter.model.config.exit_thresholds_per_head() == (1.0, 1.0, 1.0)  # base stage: no pruning


def test_prune_stage_fine_tunes_the_heads_in_two_processes(finetune_runs, tmp_path):
    """DDP with pruning in training and a frozen backbone: a threshold every token clears makes all but the
    `keep_top_k` most confident tokens of each class exit, and the saved model prunes."""
    output_dir = tmp_path / "prune"
    output = run_finetune(
        output_dir,
        "--model_name_or_path", str(finetune_runs["full"]), "--stage", "prune", "--exit_threshold", "0.001",
        "--train_scope", "heads", "--synthetic_image_size", "32", "--synthetic_train_samples", "8",
        "--synthetic_validation_samples", "5", "--per_device_train_batch_size", "2", "--max_train_steps", "2",
        "--learning_rate", "1e-3",
    )  # fmt: skip
    assert "process 1 of world size 2" in output and "train scope heads" in output
    base = json.loads((finetune_runs["full"] / "all_results.json").read_text())
    pruned = json.loads((output_dir / "all_results.json").read_text())
    assert pruned["exit_threshold"] == [0.001, 0.001]
    assert pruned["eval_exit_share"][0] > 0.3 and pruned["eval_gflops"] < 0.8 * base["eval_gflops"]
    assert math.isfinite(read_losses(output_dir)[2])
    reloaded = DToPForSemanticSegmentation.from_pretrained(output_dir)
    assert reloaded.config.exit_thresholds_per_head() == (0.001, 0.001, 1.0)
    base_model = DToPForSemanticSegmentation.from_pretrained(finetune_runs["full"])
    for name, parameter in reloaded.dtop.layers.named_parameters():  # frozen backbone left as it was
        assert torch.equal(parameter, dict(base_model.dtop.layers.named_parameters())[name]), name


def test_paper_preset_trains_with_the_official_recipe_in_both_stages(tmp_path):
    """`--paper_preset dtop-vit-base-ade20k` on an ADE20K release folder (a tiny backbone through --config_overrides):
    the saved config carries the preset's drop path and thresholds, phase 2 prunes in training, and the processor is
    the official test mode. A data set with other classes is refused."""
    from test_data_layouts import write_ade20k

    folder = write_ade20k(tmp_path / "data")
    common = [
        "--device", "cpu", "--paper_preset", "dtop-vit-base-ade20k", "--dataset_name", str(folder),
        "--max_eval_samples", "1",
        "--config_overrides", TINY_OVERRIDES.replace("patch_size=4", "patch_size=16"), "--train_scale", "256", "64",
        "--crop_size", "64", "--max_train_steps", "2", "--num_warmup_steps", "1", "--per_device_train_batch_size", "2",
    ]  # fmt: skip
    run_example("finetune", [*common, "--stage", "base", "--output_dir", str(tmp_path / "base")])
    prune_stage = ["--stage", "prune", "--model_name_or_path", str(tmp_path / "base"), "--no-sliding_window"]
    with pytest.warns(FutureWarning, match="`--no-sliding_window` is deprecated"):
        run_example("finetune", [*common, *prune_stage, "--output_dir", str(tmp_path / "prune")])
    base = json.loads((tmp_path / "base" / "config.json").read_text())
    prune = json.loads((tmp_path / "prune" / "config.json").read_text())
    assert (base["drop_path_rate"], base["exit_threshold"], base["prune_during_training"]) == (0.1, 1.0, False)
    assert (prune["drop_path_rate"], prune["exit_threshold"], prune["prune_during_training"]) == (0.1, 0.9, True)
    assert len(base["id2label"]) == 150 and base["image_size"] == 64 and base["out_indices"] == [1, 2, 3]
    processor = json.loads((tmp_path / "prune" / "preprocessor_config.json").read_text())
    assert processor["do_split_image"] and processor["size"] == {"longest_edge": 2048, "shortest_edge": 512}
    assert processor["image_mean"] == [0.485, 0.456, 0.406] and processor["image_std"] == [0.229, 0.224, 0.225]
    # `--crop_size 64` overrides the official 512 / 341 windows (stride 2/3 of the crop).
    assert processor["crop_size"] == {"height": 64, "width": 64} and processor["stride"] == {"height": 42, "width": 42}
    # The preset evaluates in slide mode; an explicit flag (here in its earlier spelling) overrides it.
    assert preset_defaults("dtop-vit-base-ade20k", "base")["sliding_window"] is True
    base_results, prune_results = (
        json.loads((tmp_path / name / "all_results.json").read_text()) for name in ("base", "prune")
    )
    assert base_results["sliding_window"] is True and prune_results["sliding_window"] is False
    with pytest.raises(ValueError, match="150 classes"):
        builtin = ["--synthetic_image_size", "32", "--synthetic_train_samples", "2"]
        builtin += ["--synthetic_validation_samples", "1"]
        preset = ["--device", "cpu", "--paper_preset", "dtop-vit-base-ade20k"]
        run_example("finetune", [*preset, *builtin, "--output_dir", str(tmp_path)])
