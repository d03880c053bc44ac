"""The one image decoder: any image file -> (H, W, 3) uint8 RGB.

- :func:`decode_rgb` returns the array or raises :class:`ImageLoadError` naming the file and the fix;
- :func:`try_decode` returns ``(array, None)`` or ``(None, message)``: for steps that skip and list
  unreadable images instead of stopping (``load_image`` is the old name of ``decode_rgb``);
- :func:`decode_chw_float` gives the detector's float CHW tensor in 0..1.

Conversions (chosen to match the reference, which calls PIL's ``convert("RGB")``):
- L / 1 / P / CMYK / YCbCr / LAB / HSV: PIL's ``convert("RGB")`` (palette applied).
- RGBA / LA / PA / transparent palettes: alpha is DROPPED (not composited), exactly what
  ``convert("RGB")`` does in the reference.
- 16-bit (``I;16*``) and 32-bit integer (``I``) grayscale: rescaled, not clipped: values / 257
  (65535 -> 255) when they fit 16 bits, else / (2**32 - 1) * 255; negatives clip to 0.
  Float (``F``): [0, 1] data scaled by 255, anything else clipped to [0, 255].
- EXIF orientation is NOT applied (the reference does not): pixels are used as stored.
- Multi-frame files (GIF, TIFF): the first frame.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline.data.errors import ImageLoadError


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if mode == "F":
            a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
        elif mode.startswith("I;16") or np.max(a, initial=0) <= 65535:
            a = a / 257.0
        else:
            a = a / (2.0 ** 32 - 1) * 255.0
        g = np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    return np.array(img.convert("RGB"), dtype=np.uint8)  # writable copy


def decode_rgb(path: str | os.PathLike, min_size: int = 1) -> np.ndarray:
    """Decode ``path`` to (H, W, 3) uint8 RGB; images with a side < ``min_size`` are rejected."""
    path = str(path)
    if not os.path.isfile(path):
        raise ImageLoadError(f"image not found: {path}. Check the dataset root or remove the id from the image set.")
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as img:
            img.load()
            arr = _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageLoadError(f"not an image file (or unsupported format): {path}. "
                             f"Remove it from the image set.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        what = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise ImageLoadError(f"{what} image {path} ({type(e).__name__}: {e}): re-download the file or "
                             f"remove it from the image set.") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"image {path} is too large to decode safely ({e})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    h, w = arr.shape[:2]
    if h < min_size or w < min_size:
        raise ImageLoadError(f"image {path} is {w}x{h} pixels (W x H), smaller than one patch "
                             f"({min_size} px): remove it from the image set.")
    return arr


load_image = decode_rgb  # the historical name, used across the code base


def try_decode(path: str | os.PathLike, min_size: int = 1) -> tuple[np.ndarray | None, str | None]:
    """``(image, None)``, or ``(None, why)`` when :func:`decode_rgb` fails (missing, corrupt, truncated,
    not an image, too large, smaller than ``min_size``): the caller skips the image and lists ``why``."""
    try:
        return decode_rgb(path, min_size=min_size), None
    except ImageLoadError as e:
        return None, str(e)


def decode_chw_float(path: str | os.PathLike):
    """The image as a float32 (3, H, W) torch tensor in 0..1 (what the detectors take)."""
    import torch

    return torch.from_numpy(decode_rgb(path)).permute(2, 0, 1).float().div_(255.0)
