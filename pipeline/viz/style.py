"""What every picture shares: the colours, the title font (with the glyphs of non-ASCII file names),
the title band, the legend line, one way to finish a picture (:func:`finish_picture`) and one PNG writer.

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
from typing import NamedTuple, Sequence

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from pipeline.artifacts import atomic_path

PRED = (255, 40, 40)         # predicted / detected boxes
GT = (40, 220, 60)           # ground-truth boxes
SEED = (255, 220, 0)         # the seed patch of a miner
EXPANSION = (0, 140, 255)    # the patches a miner expanded over
COMPONENT = (255, 255, 255)  # outline of the mined component
NEGATIVE = (40, 90, 255)     # a cut's eigenvector < 0 (background side)
ZERO = (255, 255, 255)       # a cut's eigenvector = 0
POSITIVE = (255, 60, 40)     # a cut's eigenvector > 0 (object side)
TITLE_BG = (0, 0, 0)
TITLE_FG = (255, 255, 255)
TITLE_SIZE = 13              # pixels
LEGEND_SIZE = 11             # pixels
TITLE_BAND = TITLE_SIZE + 6  # height of a title band above a picture (finish_picture)
LEGEND_BAND = LEGEND_SIZE + 6  # height of the legend line below a picture (legend_band at LEGEND_SIZE)

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


class Key(NamedTuple):
    """One entry of a legend line: a swatch of ``colour`` and its ``text``. ``outline`` 0 draws a filled
    square (a tint, a heat-map colour); n > 0 an outlined square with an n-pixel line (how boxes are drawn,
    so a thin and a thick box of one colour can be told apart)."""

    colour: tuple[int, int, int]
    text: str
    outline: int = 0


def _text_width(text: str, font) -> int:
    return int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)) if text else 0


def legend_band(keys: Sequence[Key], note: str = "", size: int = LEGEND_SIZE) -> Image.Image:
    """One line on a black band, as wide as it needs (never cut off): for each key its swatch and text, then
    ``note``."""
    font = font_for(" ".join([k.text for k in keys] + [note]), size)
    gap, pad, swatch = 3, 4, size
    pieces = []  # (x of the swatch or None, key or None, x of the text, text)
    x = pad
    for k in keys:
        pieces.append((x, k, x + swatch + gap, k.text))
        x += swatch + gap + _text_width(k.text, font) + 3 * gap
    if note:
        pieces.append((None, None, x, note))
        x += _text_width(note, font) + gap
    band = Image.new("RGB", (x + pad, size + 6), TITLE_BG)
    d = ImageDraw.Draw(band)
    for sx, k, tx, text in pieces:
        if k is not None:
            rect = [sx, 3, sx + swatch - 1, 3 + swatch - 1]
            if k.outline > 0:
                d.rectangle(rect, outline=k.colour, width=min(int(k.outline), swatch // 2))
            else:
                d.rectangle(rect, fill=k.colour)
        d.text((tx, 2), text, fill=TITLE_FG, font=font)
    return band


def finish_picture(picture: Image.Image, title: str = "", keys: Sequence[Key] = (), skipped: int = 0,
                   title_room: int | None = None) -> Image.Image:
    """The picture as it is saved: ``title`` and a legend line saying what the colours (``keys``) mean.

    The title is drawn over the picture's top left, as every picture had it, when the picture leaves room
    for it (at least three title bands tall and ``title_room`` pixels wide, default its width); over a
    smaller picture (down to 1 x 1) it would hide most of it, so it gets a band above instead. The legend
    is a band below, with ``"<skipped> box(es) not drawn"`` appended when boxes could not be drawn (NaN/inf or
    wholly outside, see :func:`pipeline.viz.boxes.draw_boxes`). The canvas is widened to the wider text, so
    no text is cut off on a narrow picture. ``info["skipped_boxes"]`` records ``skipped``."""
    font = font_for(title, TITLE_SIZE) if title else None
    room = picture.width if title_room is None else int(title_room)
    over = bool(title) and picture.height >= 3 * TITLE_BAND and _text_width(title, font) + 8 <= room
    if over:
        draw_title(picture, title)
    top = None
    if title and not over:
        top = draw_title(Image.new("RGB", (_text_width(title, font) + 8, TITLE_BAND), TITLE_BG), title)
    note = f"{skipped} box{'es' if skipped != 1 else ''} not drawn (NaN/inf or outside)" if skipped else ""
    bottom = legend_band(keys, note) if keys or note else None
    parts = [p for p in (top, picture, bottom) if p is not None]
    out = picture
    if len(parts) > 1:
        out = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), TITLE_BG)
        y = 0
        for p in parts:
            out.paste(p, (0, y))
            y += p.height
    out.info["skipped_boxes"] = int(skipped)
    return out


def save_png(image: Image.Image, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write ``image`` as a PNG atomically; ``title`` is also stored as the PNG's ``Title`` text chunk."""
    info = None
    if title:
        info = PngInfo()
        info.add_itxt("Title", title)
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)
