"""Images: any path, bytes, PIL image or array -> 48x48 patches for the vision embedder.

Follows the reference `Gemma4UnifiedImageProcessor`: aspect-preserving resize so that the image gives at
most `budget * 9` 16-px patches with sides multiple of 48, bicubic with antialias, [0, 1] pixels, 48x48
patches in row-major order with (x, y) positions, padding patches of zeros at (-1, -1).
"""

from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .audio import describe_source
from .errors import MediaError, readable_source
from .limits import DEFAULT_BUDGET, SUPPORTED_BUDGETS

TEACHER_PATCH = 16
POOLING_KERNEL = 3
MODEL_PATCH = TEACHER_PATCH * POOLING_KERNEL  # 48
PATCH_DIM = MODEL_PATCH * MODEL_PATCH * 3  # 6912
# Larger images are refused before decoding (decompression bombs, absurd scans): 8192 x 8192.
MAX_IMAGE_PIXELS = 8192 * 8192
# What Pillow raises for a damaged file while decoding, beyond OSError: its plugins parse headers and
# chunks with struct and plain indexing, and refuse pixel counts over its own bomb limit.
_DECODER_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, ZeroDivisionError, struct.error,
    Image.DecompressionBombError,
)
# EXIF orientations that swap width and height.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)

ImageSource = str | Path | bytes | Image.Image | np.ndarray


def check_budget(max_soft_tokens: int) -> None:
    if max_soft_tokens not in SUPPORTED_BUDGETS:
        raise MediaError(f"image budget must be one of {SUPPORTED_BUDGETS}, got {max_soft_tokens!r}")


def target_size(height: int, width: int, max_soft_tokens: int) -> tuple[int, int]:
    """(height, width) after the reference's aspect-preserving resize (`get_aspect_ratio_preserving_size`)."""
    max_patches = max_soft_tokens * POOLING_KERNEL**2
    factor = math.sqrt(max_patches * TEACHER_PATCH**2 / (height * width))
    target_height = math.floor(factor * height / MODEL_PATCH) * MODEL_PATCH
    target_width = math.floor(factor * width / MODEL_PATCH) * MODEL_PATCH
    max_side = max_soft_tokens * MODEL_PATCH
    # Very elongated images: one row (or column) of patches, as long as the budget allows.
    if target_height == 0:
        target_height, target_width = MODEL_PATCH, min(width // height * MODEL_PATCH, max_side)
    elif target_width == 0:
        target_height, target_width = min(height // width * MODEL_PATCH, max_side), MODEL_PATCH
    return target_height, target_width


def image_num_tokens(height: int, width: int, max_soft_tokens: int = DEFAULT_BUDGET) -> int:
    """Soft tokens an image of this size takes at this budget."""
    check_budget(max_soft_tokens)
    target_height, target_width = target_size(height, width, max_soft_tokens)
    return (target_height // MODEL_PATCH) * (target_width // MODEL_PATCH)


def image_size(image: ImageSource) -> tuple[int, int]:
    """(height, width) after EXIF orientation, reading only the header of encoded images."""
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, describe_source(image)).shape[:2]
    name = describe_source(image)
    pil_image = _open(image) if not isinstance(image, Image.Image) else _checked_size(image, name)
    width, height = pil_image.size
    try:
        orientation = pil_image.getexif().get(ImageOps.ExifTags.Base.Orientation)
    except _DECODER_ERRORS as error:
        raise MediaError(f"{name}: cannot read the image's EXIF data ({error})") from error
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return height, width


def load_image(image: ImageSource) -> np.ndarray:
    """Decode to an `[H, W, 3]` uint8 RGB array: EXIF orientation applied, alpha composited over white."""
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, describe_source(image))
    name = describe_source(image)
    pil_image = _checked_size(image, name) if isinstance(image, Image.Image) else _open(image)
    try:
        pil_image = ImageOps.exif_transpose(pil_image)
        return np.asarray(_pil_to_rgb(pil_image))
    except _DECODER_ERRORS as error:
        raise MediaError(f"{name}: cannot decode image ({error})") from error


def preprocess_image(image: ImageSource, max_soft_tokens: int = DEFAULT_BUDGET) -> dict:
    """`pixel_values [budget, 6912]` float32, `image_position_ids [budget, 2]` int64, `num_soft_tokens`."""
    check_budget(max_soft_tokens)
    return patchify(load_image(image), max_soft_tokens)


def patchify(rgb: np.ndarray, max_soft_tokens: int) -> dict:
    """Resize an `[H, W, 3]` uint8 image for the budget and cut it into padded 48x48 patches."""
    height, width = rgb.shape[:2]
    target_height, target_width = target_size(height, width, max_soft_tokens)
    if (target_height, target_width) != (height, width):
        # Pillow's bicubic widens its kernel when shrinking, i.e. it is antialiased like the reference.
        rgb = np.asarray(Image.fromarray(rgb).resize((target_width, target_height), Image.Resampling.BICUBIC))
    rows, cols = target_height // MODEL_PATCH, target_width // MODEL_PATCH
    patches = (
        rgb.reshape(rows, MODEL_PATCH, cols, MODEL_PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    )
    num_patches = rows * cols
    pixel_values = np.zeros((max_soft_tokens, PATCH_DIM), dtype=np.float32)
    pixel_values[:num_patches] = patches.astype(np.float32) / 255.0
    positions = np.full((max_soft_tokens, 2), -1, dtype=np.int64)
    y, x = np.divmod(np.arange(num_patches), cols)
    positions[:num_patches] = np.stack([x, y], axis=-1)
    return {"pixel_values": pixel_values, "image_position_ids": positions, "num_soft_tokens": num_patches}


def _open(source: str | Path | bytes) -> Image.Image:
    name = describe_source(source)
    data = readable_source(source, name, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            pil_image = Image.open(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise MediaError(f"{name}: image too large ({error})") from error
    except (UnidentifiedImageError, *_DECODER_ERRORS) as error:
        raise MediaError(f"{name}: not a readable image ({error})") from error
    return _checked_size(pil_image, name)


def _checked_size(pil_image: Image.Image, name: str) -> Image.Image:
    """`pil_image` when its size can be decoded and resized: not empty (no aspect ratio to keep), not
    above MAX_IMAGE_PIXELS (its decoded pixels would not fit in memory); the header's size, so an
    encoded image is judged before its pixels are decoded."""
    width, height = pil_image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(f"{name}: image too large ({width}x{height}, limit {MAX_IMAGE_PIXELS} pixels)")
    if width <= 0 or height <= 0:
        raise MediaError(f"{name}: image has zero size ({width}x{height})")
    return pil_image


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit (and float) grayscale: map the full 16-bit range to 8 bits instead of clipping at 255.
        values = np.asarray(image, dtype=np.float64)
        scale = 1.0 if image.mode == "F" and values.max(initial=0) <= 1.0 else 65535.0
        gray = np.clip(np.rint(values / scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise MediaError(f"{name}: expected an [H, W], [H, W, 1|3|4] image array, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise MediaError(f"{name}: image has zero size")
    if array.shape[0] * array.shape[1] > MAX_IMAGE_PIXELS:
        raise MediaError(f"{name}: image too large ({array.shape[1]}x{array.shape[0]})")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise MediaError(f"{name}: image contains NaN or infinite values")
        array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    elif array.dtype == np.uint16:
        array = np.rint(array / 257.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise MediaError(f"{name}: unsupported pixel type {array.dtype}")
    if array.shape[2] == 4:
        alpha = array[..., 3:].astype(np.float32) / 255.0
        array = np.rint(array[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    elif array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)
