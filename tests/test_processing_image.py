"""Image preprocessing: the reference size rule, pixel values against mlx-vlm, modes, limits, errors."""

import io
from pathlib import Path

import numpy as np
import pytest
from media_files import png_header_only
from mlx_vlm.models.gemma4_unified.processing_gemma4_unified import (
    Gemma4UnifiedImageProcessor as MlxVlmProcessor,
)
from PIL import Image
from transformers.models.gemma4_unified.processing_gemma4_unified import get_aspect_ratio_preserving_size

from mlx_unified.processing import SUPPORTED_BUDGETS, MediaError, image_num_tokens, preprocess_image

PHOTOS = sorted((Path(__file__).parent / "data").glob("*.jpg"))
SIZES = [
    (1, 1),
    (1, 2000),
    (2000, 1),
    (3, 5000),
    (48, 48),
    (224, 224),
    (480, 640),
    (640, 480),
    (1080, 1920),
    (1920, 1080),
    (100, 3000),
    (3000, 100),
    (333, 777),
    (4000, 3000),
    (17, 4096),
    (720, 477),
    (1, 48),
]


@pytest.mark.parametrize("budget", SUPPORTED_BUDGETS)
def test_token_counts_follow_reference_size_rule(budget):
    for height, width in SIZES:
        target_h, target_w = get_aspect_ratio_preserving_size(height, width, 16, budget * 9, 3)
        expected = (target_h // 48) * (target_w // 48)
        assert image_num_tokens(height, width, budget) == expected, (height, width)
        assert 0 < expected <= budget


@pytest.mark.parametrize("budget", [70, 280, 1120])
def test_pixel_values_match_mlx_vlm_on_photos(budget):
    assert len(PHOTOS) == 2
    for photo in PHOTOS:
        ours = preprocess_image(photo, budget)
        theirs, counts = MlxVlmProcessor(max_soft_tokens=budget)(Image.open(photo))
        assert ours["num_soft_tokens"] == counts[0]
        np.testing.assert_allclose(ours["pixel_values"], theirs["pixel_values"][0], atol=1e-6)
        np.testing.assert_array_equal(ours["image_position_ids"], theirs["image_position_ids"][0])


def test_layout_patches_positions_and_padding():
    rgb = np.random.default_rng(0).integers(0, 256, (288, 480, 3), dtype=np.uint8)
    # 288x480 is already the size the rule picks at budget 70 (6x10 patches), so patches are exact crops.
    out = preprocess_image(rgb, 70)
    assert out["num_soft_tokens"] == 60
    assert out["pixel_values"].shape == (70, 6912) and out["pixel_values"].dtype == np.float32
    assert out["image_position_ids"].shape == (70, 2)
    expected_positions = [[x, y] for y in range(6) for x in range(10)]
    np.testing.assert_array_equal(out["image_position_ids"][:60], expected_positions)
    np.testing.assert_array_equal(out["image_position_ids"][60:], -1)
    np.testing.assert_array_equal(out["pixel_values"][60:], 0)
    # Patch 13 is row 1, column 3, flattened row-major (48, 48, RGB).
    np.testing.assert_allclose(out["pixel_values"][13], rgb[48:96, 144:192].reshape(-1) / 255.0, atol=1e-7)


def test_inputs_path_bytes_pil_array_agree(tmp_path):
    photo = PHOTOS[0]
    reference = preprocess_image(photo)["pixel_values"]
    for source in (str(photo), photo.read_bytes(), Image.open(photo), np.asarray(Image.open(photo))):
        np.testing.assert_array_equal(preprocess_image(source)["pixel_values"], reference)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (120, 60), "white")
    image.paste((255, 0, 0), (0, 0, 60, 60))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    upright = np.asarray(image.transpose(Image.Transpose.ROTATE_270))
    assert image_num_tokens(120, 60) == preprocess_image(buffer.getvalue())["num_soft_tokens"]
    # JPEG ringing at the red/white edge aside, the decoded image is the upright one.
    difference = (
        preprocess_image(buffer.getvalue())["pixel_values"] - preprocess_image(upright)["pixel_values"]
    )
    assert np.abs(difference).mean() < 0.01


def mode_image(mode: str) -> Image.Image:
    if mode == "RGBA":
        return Image.new("RGBA", (50, 50), (255, 0, 0, 0))
    if mode == "LA":
        return Image.new("LA", (50, 50), (0, 0))
    if mode == "P":
        image = Image.new("P", (50, 50), 0)
        image.putpalette([0, 0, 0] * 256)
        image.info["transparency"] = 0
        return image
    if mode == "CMYK":
        return Image.new("CMYK", (50, 50), (0, 0, 0, 0))
    if mode == "I;16":
        return Image.fromarray(np.full((50, 50), 65535, np.uint16))
    return Image.new(mode, (50, 50), 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "I;16", "L", "1"])
def test_every_mode_becomes_white_rgb(mode, tmp_path):
    image = mode_image(mode)
    path = tmp_path / ("a.tiff" if mode in ("CMYK", "I;16") else "a.png")
    image.save(path)
    for source in (image, path):
        out = preprocess_image(source, 70)
        n = out["num_soft_tokens"]
        # Transparent pixels go over white; white CMYK, full-range 16-bit and 255 gray are white too.
        np.testing.assert_allclose(out["pixel_values"][:n], 1.0, atol=1 / 255)


def test_one_pixel_image_works():
    out = preprocess_image(np.zeros((1, 1, 3), np.uint8))
    assert out["num_soft_tokens"] == image_num_tokens(1, 1) == 256


def test_bad_images_raise_media_error(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "bomb.png").write_bytes(png_header_only(30000, 30000))
    (tmp_path / "wide.png").write_bytes(png_header_only(200000, 400))
    for name in ("missing.png", "empty.png", "corrupt.png", "notes.txt", "bomb.png", "wide.png"):
        with pytest.raises(MediaError, match=name):
            preprocess_image(tmp_path / name)
    truncated = PHOTOS[0].read_bytes()[:2000]
    for bad in (
        b"",
        truncated,
        np.zeros((0, 5, 3), np.uint8),
        np.zeros((4, 4, 2), np.uint8),
        np.full((4, 4, 3), np.nan, np.float32),
        np.zeros((4, 4, 3), np.int64),
        12345,
    ):
        with pytest.raises(MediaError):
            preprocess_image(bad)


@pytest.mark.parametrize("budget", [0, 69, 100, 281, 2240, "280"])
def test_unsupported_budgets_refused(budget):
    with pytest.raises(MediaError, match="budget"):
        preprocess_image(np.zeros((10, 10, 3), np.uint8), budget)
    with pytest.raises(MediaError, match="budget"):
        image_num_tokens(10, 10, budget)
