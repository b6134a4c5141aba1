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
"""examples/segment.py on real photos (scikit-image's), grey / RGBA / palette / EXIF-rotated / broken inputs."""

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtop_hf import DToPImageProcessor
from dtop_hf.toolkit.evaluation.flops import count_flops
from dtop_hf.toolkit.inference.images import open_image
from dtop_hf.toolkit.inference.loading import load_model_and_processor
from dtop_hf.toolkit.inference.segmentation import segment_images, sliding_window_processor
from dtop_hf.toolkit.inference.visualization import make_palette


skimage_data = pytest.importorskip(
    "skimage.data", reason="scikit-image ships the test photos (pip install -e '.[dev]')"
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "segment.py"
IMAGE_SIZE, PATCH_SIZE = 32, 4
GRID_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
EXIF_ORIENTATION_TAG = 0x0112
ROTATED_90_CLOCKWISE = 6  # the stored pixels must be turned 90 degrees clockwise to be upright: width <-> height


def segment(argv: list[str]) -> int:
    """The script's `main(argv)`, in this process."""
    from conftest import run_example

    return run_example("segment", argv)


def segment_image(model, image_processor, image, exit_threshold, sliding_window: bool = False):
    """One image through the inference API, whole or in slide mode."""
    processor = sliding_window_processor(image_processor) if sliding_window else image_processor
    return segment_images(model, processor, [image], exit_threshold=exit_threshold)[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Real photos in the modes people have: an EXIF-rotated JPEG, a grey PNG, an RGBA PNG (half transparent),
    a palette GIF in a folder, and a file of random bytes named .jpg."""
    folder = tmp_path_factory.mktemp("photos")
    paths = {}
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = ROTATED_90_CLOCKWISE
    paths["astronaut"] = folder / "astronaut.jpg"
    Image.fromarray(skimage_data.astronaut()[:384]).save(paths["astronaut"], exif=exif, quality=90)  # stored 512x384
    paths["camera"] = folder / "camera.png"
    Image.fromarray(skimage_data.camera()[:300, :400]).save(paths["camera"])  # mode L
    coffee = skimage_data.coffee()
    alpha = np.tile(np.linspace(0, 255, coffee.shape[1]).astype(np.uint8), (coffee.shape[0], 1))
    paths["coffee"] = folder / "coffee_rgba.png"
    Image.fromarray(np.dstack([coffee, alpha]), "RGBA").save(paths["coffee"])
    in_folder = folder / "more"
    in_folder.mkdir()
    paths["chelsea"] = in_folder / "chelsea.gif"
    Image.fromarray(skimage_data.chelsea()).convert("P").save(paths["chelsea"])  # mode P
    (in_folder / "notes.txt").write_text("not an image, and not looked at inside a folder")
    paths["broken"] = folder / "broken.jpg"
    paths["broken"].write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    return paths


def upright_size(path: Path) -> tuple[int, int]:
    """`(width, height)` as shown, EXIF rotation applied (what the written maps must match)."""
    with Image.open(path) as image:
        width, height = image.size
        rotated = image.getexif().get(EXIF_ORIENTATION_TAG) in (5, 6, 7, 8)
    return (height, width) if rotated else (width, height)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random DToP (8x8 token grid, 5 classes) saved with its image processor."""
    from conftest import DToPModelTester

    folder = tmp_path_factory.mktemp("model")
    # initializer_range 0.5: random heads with confident, varied predictions, so that low thresholds prune.
    model = DToPModelTester(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_labels=5, initializer_range=0.5
    ).create_model()
    model.save_pretrained(folder)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    DToPImageProcessor(size=size, crop_size=size, stride={"height": 24, "width": 24}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model_and_processor(str(model_dir))


@pytest.fixture(scope="module")
def pruning_threshold(loaded, photos):
    """A threshold at which about half of the astronaut's tokens are exit candidates at the first head."""
    from conftest import pruning_thresholds

    model, image_processor = loaded
    pixel_values = image_processor(images=open_image(photos["astronaut"]), return_tensors="pt")["pixel_values"]
    return pruning_thresholds(model, pixel_values)[0]


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=REPO_ROOT)


def test_cli_segments_real_photos_and_skips_the_broken_file(photos, model_dir, pruning_threshold, tmp_path):
    output_dir = tmp_path / "out"
    completed = run_script(
        str(photos["astronaut"]), str(photos["camera"]), str(photos["broken"]), str(photos["coffee"]),
        str(photos["chelsea"].parent), "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir),
        "--exit_threshold", f"{pruning_threshold:.6f}",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert re.search(r"skipped .*broken\.jpg: not a readable image", completed.stderr), completed.stderr
    assert "Segmented 4 image(s), skipped 1" in completed.stdout
    assert re.search(r"exited at head 1 \(layer 2\): \d+ tokens, head 2 \(layer 3\): \d+ tokens", completed.stdout)
    assert "notes" not in completed.stdout + completed.stderr  # folders are searched for image files only

    exits_per_image = re.findall(
        r"\((\d+)x(\d+)\): (\d+) tokens; exited at (.*)\n\s+GFLOPs ([\d.e-]+)", completed.stdout
    )
    assert len(exits_per_image) == 4, completed.stdout
    early_exits = 0
    for width, height, num_tokens, exits, gflops in exits_per_image:
        # "head 1 (layer 2): 12 tokens, head 2 (layer 3): 5 tokens, decode head (layer 4): 47 tokens"
        counts = [int(count) for count in re.findall(r": (\d+) tokens", exits)]
        assert len(counts) == 3 and sum(counts) == int(num_tokens) == GRID_TOKENS, exits
        early_exits += sum(counts[:-1])
        assert float(gflops) > 0
    assert early_exits > 0, "the pruning threshold let no token exit early"

    for name in ("astronaut", "camera", "coffee_rgba", "chelsea"):
        source = next(path for path in photos.values() if path.stem == name)
        size = upright_size(source)
        for kind in ("segmentation", "overlay"):
            with Image.open(output_dir / f"{name}_{kind}.png") as picture:
                assert picture.size == size, (name, kind)
                assert picture.mode == "RGB"
        with Image.open(output_dir / f"{name}_exit_map.png") as figure:
            # Two panels (image | exit map) side by side, the legend below.
            assert figure.width > 2 * min(size[0], 512) * 0.9 and figure.height > min(size[1], 512) * 0.5
    assert upright_size(photos["astronaut"]) == (384, 512)


def test_exit_code_is_non_zero_only_when_no_image_could_be_segmented(photos, model_dir, tmp_path, capsys):
    flags = ["--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path)]
    assert segment([str(photos["broken"]), str(tmp_path / "missing.jpg"), *flags]) == 1
    captured = capsys.readouterr()
    assert "no such file" in captured.err and "no image could be segmented" in captured.err
    assert segment([str(photos["broken"]), str(photos["camera"]), *flags]) == 0


def test_open_image_turns_every_mode_into_upright_rgb(photos, tmp_path):
    astronaut = open_image(photos["astronaut"])
    assert astronaut.mode == "RGB" and astronaut.size == (384, 512)
    grey = open_image(photos["camera"])
    assert grey.mode == "RGB" and np.array_equal(np.asarray(grey)[..., 0], np.asarray(grey)[..., 2])
    rgba = open_image(photos["coffee"])
    # Fully transparent column -> the white background; fully opaque column -> the photo's own colours.
    assert (np.asarray(rgba)[:, 0] == 255).all()
    assert np.array_equal(np.asarray(rgba)[:, -1], skimage_data.coffee()[:, -1])
    assert open_image(photos["chelsea"]).mode == "RGB"
    sixteen_bit = tmp_path / "depth.png"
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 10).save(sixteen_bit)
    stretched = np.asarray(open_image(sixteen_bit))
    assert stretched.min() == 0 and stretched.max() == 255  # not clipped to white
    with pytest.raises(OSError):
        open_image(photos["broken"])


def test_threshold_one_is_unpruned_and_a_lower_one_saves_what_count_flops_says(loaded, photos, pruning_threshold):
    model, image_processor = loaded
    image = open_image(photos["astronaut"])
    unpruned = segment_image(model, image_processor, image, exit_threshold=1.0)
    assert unpruned.exits == [0, 0, GRID_TOKENS]
    assert unpruned.gflops == pytest.approx(unpruned.gflops_unpruned)
    assert unpruned.segmentation.shape == unpruned.exit_map.shape == (image.height, image.width)
    assert (unpruned.exit_map == 2).all()

    pruned = segment_image(model, image_processor, image, exit_threshold=pruning_threshold)
    assert pruned.exits[0] > 0 and sum(pruned.exits) == GRID_TOKENS
    assert pruned.gflops_unpruned == pytest.approx(unpruned.gflops_unpruned)
    assert pruned.gflops < unpruned.gflops
    pixel_values = image_processor(images=image, return_tensors="pt")["pixel_values"]
    flops = count_flops(model, pixel_values, exit_threshold=pruning_threshold)
    assert pruned.gflops == pytest.approx(float(flops.backbone_and_final_head[0]))
    assert pruned.gflops_all_heads == pytest.approx(float(flops.total[0]))
    # The exit map says which head finalised each pixel's token: the counts agree with the exits (nearest resize).
    assert set(np.unique(pruned.exit_map).tolist()) == {stage for stage, count in enumerate(pruned.exits) if count}


def test_sliding_window_covers_a_wide_image(loaded, photos):
    model, image_processor = loaded
    image = open_image(photos["camera"])  # 400x300 -> shorter side 32: 43x32, two 32 px windows (stride 24)
    result = segment_image(model, image_processor, image, exit_threshold=1.0, sliding_window=True)
    assert result.segmentation.shape == (300, 400)
    assert result.exits == [0, 0, 2 * GRID_TOKENS]
    whole = segment_image(model, image_processor, image, exit_threshold=1.0)
    assert result.gflops == pytest.approx(2 * whole.gflops)


def test_errors_say_how_to_fix_the_model_folder(model_dir, tmp_path):
    with pytest.raises(ValueError, match="without config.json.*Model folders inside it"):
        load_model_and_processor(str(model_dir.parent))
    without_processor = tmp_path / "no_processor"
    shutil.copytree(model_dir, without_processor)
    (without_processor / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="no preprocessor_config.json") as error:
        load_model_and_processor(str(without_processor))
    # The message's fix repairs the folder (its `python -c` code run here, in-process, to save a start-up).
    fix = shlex.split(str(error.value).splitlines()[-1])
    assert fix[:2] == ["python", "-c"] and len(fix) == 3
    exec(fix[2], {})
    model, image_processor = load_model_and_processor(str(without_processor))
    assert image_processor.size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    with pytest.raises(ValueError, match="neither a local folder nor a reachable Hub id"):
        load_model_and_processor(str(tmp_path / "does-not-exist"))


def test_help_lists_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        segment(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "default: outputs/segment" in text and "--sliding_window" in text and "--exit_threshold" in text
    assert "--per_device_eval_batch_size" in text and "--no_pictures" in text and "--overwrite" in text
    with pytest.raises(SystemExit):
        segment(["photo.jpg", "--model_name_or_path", "m", "--exit_threshold", "1.5"])
    assert re.search(r"must lie in \(0, 1\]", capsys.readouterr().err)
    # The flags of the previous release still work, with a warning naming the new one.
    with pytest.warns(FutureWarning, match="--exit_threshold"), pytest.raises(SystemExit):
        segment(["photo.jpg", "--model", "m", "--threshold", "1.5"])
    assert re.search(r"must lie in \(0, 1\]", capsys.readouterr().err)


def test_images_of_a_batch_give_what_they_give_alone(loaded, photos, pruning_threshold):
    model, image_processor = loaded
    camera = open_image(photos["camera"])
    images = [camera, open_image(photos["astronaut"]), camera.transpose(Image.FLIP_LEFT_RIGHT)]
    for sliding_window in (False, True):
        processor = sliding_window_processor(image_processor) if sliding_window else image_processor
        together = segment_images(model, processor, images, exit_threshold=pruning_threshold)
        for image, result in zip(images, together, strict=True):
            alone = segment_image(model, image_processor, image, pruning_threshold, sliding_window)
            assert np.array_equal(result.segmentation, alone.segmentation)
            assert np.array_equal(result.exit_map, alone.exit_map) and result.exits == alone.exits
            assert result.gflops == pytest.approx(alone.gflops, rel=1e-12)


def test_no_pictures_writes_palette_class_maps_only(loaded, photos, model_dir, pruning_threshold, tmp_path):
    arguments = [str(photos["camera"]), "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path)]
    arguments.append("--no_pictures")
    assert segment(arguments + ["--exit_threshold", f"{pruning_threshold:.6f}"]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["camera_classes.png"]
    model, image_processor = loaded
    expected = segment_image(model, image_processor, open_image(photos["camera"]), float(f"{pruning_threshold:.6f}"))
    with Image.open(tmp_path / "camera_classes.png") as class_map:
        assert class_map.mode == "P" and class_map.size == (400, 300)
        assert np.array_equal(np.asarray(class_map), expected.segmentation)  # pixel value = class id
        palette = np.asarray(class_map.getpalette()[: 3 * 5]).reshape(5, 3)
    assert np.array_equal(palette, make_palette(5))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_launched(num_processes: int, *arguments: str) -> str:
    """segment.py through `accelerate launch` on CPU (two processes, or one); returns stdout + stderr."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes > 1:
        command += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    else:
        command += ["--num_processes", "1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [*command, str(SCRIPT), "--device", "cpu", *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=REPO_ROOT,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    return output


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_two_processes_write_what_one_writes_and_an_interrupted_run_resumes(
    photos, model_dir, pruning_threshold, tmp_path
):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "camera", "coffee", "chelsea"):
        shutil.copy(photos[name], images / photos[name].name)
    shutil.copy(photos["camera"], images / "camera_again.png")  # same size as camera.png: one batch of two
    common = [str(images), "--model_name_or_path", str(model_dir), "--exit_threshold", f"{pruning_threshold:.6f}"]

    two = tmp_path / "two_processes"
    output = run_launched(2, *common, "--output_dir", str(two), "--per_device_eval_batch_size", "2")
    assert "on 2 process(es)" in output and "Segmented 5 image(s), skipped 0, 0 already done" in output
    assert re.search(
        r"tokens exited at head 1 \(layer 2\): \d+ tokens, head 2 \(layer 3\): \d+ tokens, decode head", output
    )
    assert re.search(r"GFLOPs per image [\d.e-]+ .*\n\s+[\d.]+ images/s", output)
    one = tmp_path / "one_process"
    run_script(*common, "--output_dir", str(one))  # plain python, batch size 1
    expected = folder_bytes(one)
    assert len(expected) == 5 * 4 and folder_bytes(two) == expected

    # An interrupted run: two images never finished (one of them killed while writing its class map).
    for name in ("chelsea_exit_map.png", "coffee_rgba_classes.png", "coffee_rgba_overlay.png"):
        (two / name).unlink()
    (two / ".coffee_rgba_classes.png.tmp").write_bytes(b"half a PNG")
    redone = ("chelsea", "coffee", ".")
    untouched = {path.name: path.stat().st_mtime_ns for path in two.iterdir() if not path.name.startswith(redone)}
    output = run_launched(2, *common, "--output_dir", str(two), "--per_device_eval_batch_size", "2")
    assert "Segmented 2 image(s), skipped 0, 3 already done" in output
    assert {name: (two / name).stat().st_mtime_ns for name in untouched} == untouched  # done images not redone
    assert {name: data for name, data in folder_bytes(two).items() if not name.startswith(".")} == expected
    output = run_launched(1, *common, "--output_dir", str(two), "--overwrite")
    assert "Segmented 5 image(s), skipped 0, 0 already done" in output
