"""What every picture shares: the colours, the title font (with the glyphs of non-ASCII file names),
the title band and one PNG writer.

Fonts: the title is drawn with the first font that has every glyph of the text, tried in order:
``$LOST_FONT`` (a .ttf/.otf/.ttc path), DejaVu Sans (Debian/Ubuntu ``fonts-dejavu-core``, Fedora,
Arch, matplotlib's bundled copy when matplotlib is installed), Noto / Droid fallbacks for CJK,
macOS' Arial Unicode, Windows' Arial / Segoe UI, and last Pillow's built-in font
(``ImageFont.load_default(size)``: ASCII only, so other characters are drawn as boxes there).
When no font covers a text, the one covering most of it is used.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from pipeline.artifacts import atomic_path

PRED = (255, 40, 40)         # predicted / detected boxes
GT = (40, 220, 60)           # ground-truth boxes
SEED = (255, 220, 0)         # the seed patch of a miner
EXPANSION = (0, 140, 255)    # the patches a miner expanded over
COMPONENT = (255, 255, 255)  # outline of the mined component
TITLE_BG = (0, 0, 0)
TITLE_FG = (255, 255, 255)
TITLE_SIZE = 13              # pixels

_FONT_FILES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",          # Debian, Ubuntu (fonts-dejavu-core)
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",                   # Fedora, RHEL
    "/usr/share/fonts/TTF/DejaVuSans.ttf",                      # Arch
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",        # Fedora (newer)
    "/usr/local/share/fonts/DejaVuSans.ttf",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",   # CJK (fonts-noto-cjk)
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",     # macOS
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/arial.ttf",
    "C:/Windows/Fonts/segoeui.ttf",
)
_UNASSIGNED = "\u0378"  # no font has a glyph for it: its rendering is the font's "missing glyph" box


def font_files() -> list[str]:
    """Candidate font files present on this machine, in order of preference."""
    files = [os.environ["LOST_FONT"]] if os.environ.get("LOST_FONT") else []
    files += list(_FONT_FILES)
    try:
        import matplotlib  # noqa: PLC0415 - optional: only its bundled DejaVu Sans is used

        files.append(str(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"))
    except ImportError:
        pass
    return [f for f in dict.fromkeys(files) if os.path.isfile(f)]


@functools.lru_cache(maxsize=64)
def _truetype(path: str, size: int):
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return None


@functools.lru_cache(maxsize=8)
def default_font(size: int = TITLE_SIZE):
    """Pillow's built-in font at ``size`` (a bitmap font on a Pillow without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _missing_mask(font) -> bytes | None:
    try:
        m = font.getmask(_UNASSIGNED)
        return bytes(m) + repr(m.size).encode()
    except Exception:  # noqa: BLE001 - a font that cannot even draw the box: treat as no information
        return None


def has_glyph(font, char: str) -> bool:
    """Whether ``font`` draws ``char`` as itself, not as its missing-glyph box (spaces always pass)."""
    if char.isspace():
        return True
    box = _missing_mask(font)
    if box is None:  # cannot tell: trust ASCII only
        return ord(char) < 128
    try:
        m = font.getmask(char)
    except Exception:  # noqa: BLE001 - e.g. a bitmap font that cannot encode the character
        return False
    return bytes(m) + repr(m.size).encode() != box


def missing_glyphs(font, text: str) -> list[str]:
    """The distinct characters of ``text`` that ``font`` would draw as boxes."""
    return [c for c in dict.fromkeys(text) if not has_glyph(font, c)]


def font_for(text: str = "", size: int = TITLE_SIZE):
    """The first candidate font (see the module docstring) with every glyph of ``text``; else the one
    missing the fewest; Pillow's default font when no font file is found."""
    best, best_missing = None, None
    for path in font_files():
        font = _truetype(path, int(size))
        if font is None:
            continue
        missing = len(missing_glyphs(font, text))
        if missing == 0:
            return font
        if best is None or missing < best_missing:
            best, best_missing = font, missing
    fallback = default_font(int(size))
    if best is None or len(missing_glyphs(fallback, text)) < best_missing:
        return fallback
    return best


def draw_title(image: Image.Image, text: str, size: int = TITLE_SIZE) -> Image.Image:
    """Write ``text`` in white on a black band at the top left of ``image`` (in place); returns it."""
    if not text:
        return image
    font = font_for(text, size)
    d = ImageDraw.Draw(image)
    left, top, right, bottom = d.textbbox((4, 2), text, font=font)
    d.rectangle([0, 0, right + 4, max(bottom, 2 + size) + 3], fill=TITLE_BG)
    d.text((4, 2), text, fill=TITLE_FG, font=font)
    return image


def save_png(image: Image.Image, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write ``image`` as a PNG atomically; ``title`` is also stored as the PNG's ``Title`` text chunk."""
    info = None
    if title:
        info = PngInfo()
        info.add_itxt("Title", title)
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)
