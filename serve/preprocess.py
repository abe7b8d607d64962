"""Any image -> an MNIST-style 28x28 input, the way the MNIST digits themselves were made.

MNIST digits are white on black, size-normalized to fit a 20x20 box keeping their aspect
ratio, and centred by centre of mass in a 28x28 field. ``decode`` reads a photo or a drawing
upright (by its EXIF orientation) and grayscale; ``to_mnist`` does what MNIST did: invert when
the background is light; take the background away; leave out specks apart from the digit;
crop to the ink's bounding box; scale the longer side to 20 px; paste so the ink's centre of
mass lands at the centre. What a photo shows besides the digit (a desk around the sheet, uneven
light, the lines of ruled paper, specks) is taken away first, by serve/paper.py and serve/ruled.py.

Transparency is ink too: a canvas drawing exported as PNG is ink on a transparent background,
so transparent pixels become a background that contrasts with the ink before anything else.
An image with no ink at all is refused (``BlankImage``) rather than classified as something.
16-bit and floating-point images (scanners, microscopes, scientific TIFFs) are brought to 8 bits
over their range first: MNIST itself is 8-bit, and Pillow's own conversion would clip them.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from resserve.serve.errors import InvalidInput
from resserve.serve.paper import INK_THRESHOLD, border, dark_ink, on_the_sheet, paper_light, without_specks
from resserve.serve.ruled import without_ruled_lines

# The formats a client's image is read in: what cameras, phones, scanners, browsers and drawing
# tools write. Pillow reads many more, and hands some to other programs (EPS to Ghostscript,
# where it is installed, which then runs the client's PostScript): those bytes are refused as
# unreadable before any plugin looks at them. JPEG covers a phone's multi-picture JPEG (MPO);
# AVIF needs Pillow 11.3 or later.
FORMAT_NAMES = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP", "TIFF": "TIFF",
                "PPM": "PNM", "AVIF": "AVIF"}  # Pillow's name -> the one people know
Image.init()
READ_FORMATS = tuple(name for name in FORMAT_NAMES if name in Image.OPEN)
_KNOWN_AS = [FORMAT_NAMES[name] for name in READ_FORMATS]
UNREADABLE = f"bytes are not an image in a format this server reads ({', '.join(_KNOWN_AS[:-1])} or {_KNOWN_AS[-1]})"
TRUNCATED = "the image is truncated: its bytes end before its pixels do"
MAX_PIXELS = 16_000_000  # decompression-bomb cap: about a 4000x4000 photo
MAX_REQUEST_PIXELS = 64_000_000  # all images of one request, by their headers, before any decoding
WORKING_SIDE = 512  # larger images are box-reduced to this before any float work: the digit ends up 20 px
HEVC_IMAGE_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"})
HEIF_REFUSED = ("a HEIC photo, which this server does not read: send it as JPEG or PNG (an iPhone takes JPEG "
                "photos with Settings > Camera > Formats > Most Compatible)")
# A progressive JPEG is decoded one scan at a time, each a pass over every block of the image (2 ms
# at 16 MP here), and a scan's header is 10 bytes: 4 MB could ask for minutes of CPU. Encoders
# write about 10 scans. Every scan starts with the marker FF DA, which entropy-coded data never
# holds (a coded FF byte is followed by 00) and metadata rarely does, so counting it errs only
# towards refusing.
MAX_JPEG_SCANS = 100
JPEG_START_OF_SCAN = b"\xff\xda"
EVEN_BORDER = 0.05  # a border whose tones span less than this is one even background (drawings, scans, MNIST)
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
UNBOUNDED_MODES = frozenset({"I", "F"})  # 32-bit integers and floats: no range the format fixes


# What Pillow warns of while it reads a client's file (malformed metadata; a decompression bomb on its
# way to being refused) is about the client's input: the client hears of it, the server log does
# not, or a client could fill it. Set once for the process, as warnings.catch_warnings() is not
# thread-safe and images are read on a pool of threads.
warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
warnings.filterwarnings("ignore", category=RuntimeWarning, module="PIL")
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def _open(data: bytes) -> Image.Image:
    """The image, its header read and checked; no pixel decoded yet."""
    if not data:
        raise InvalidInput("empty image bytes")
    image = Image.open(io.BytesIO(data), formats=READ_FORMATS)
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise InvalidInput(f"image of {width}x{height} pixels exceeds the limit of {MAX_PIXELS:,} pixels")
    if image.format in ("JPEG", "MPO") and data.count(JPEG_START_OF_SCAN) > MAX_JPEG_SCANS:
        raise InvalidInput(f"a JPEG of more than {MAX_JPEG_SCANS} scans: each costs a pass over the whole image "
                           "(encoders write about 10)")
    return image


def _readable(data: bytes, work):
    """``work()``, with Pillow's failures on bad bytes as one InvalidInput.

    Pillow raises exceptions of many kinds on malformed files (a TIFF whose strip offset is a
    float: TypeError), and its own fuzzers take any ``Exception`` as a refused file, so every
    one is an unreadable image here, not a server error."""
    try:
        return work()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's own cap, above ours
        raise InvalidInput(f"image exceeds the limit of {MAX_PIXELS:,} pixels") from None
    except InvalidInput:
        raise
    except Exception as exc:
        if is_heif(data):
            raise InvalidInput(HEIF_REFUSED) from None
        if isinstance(exc, UnidentifiedImageError):
            raise InvalidInput(UNREADABLE) from None
        if isinstance(exc, OSError) and str(exc).startswith("image file is truncated"):  # an upload cut short
            raise InvalidInput(TRUNCATED) from None
        raise InvalidInput(f"bytes are not an image Pillow can read ({type(exc).__name__})") from None


def is_heif(data: bytes) -> bool:
    """Whether ``data`` is a HEIC/HEIF photo (an iPhone camera's default format), which Pillow does
    not read: its ISO media file's leading ``ftyp`` box names a HEVC-coded image brand."""
    box_size = int.from_bytes(data[:4], "big")
    if data[4:8] != b"ftyp" or not 16 <= box_size <= min(len(data), 4096):
        return False
    brands = [data[i:i + 4] for i in range(8, box_size - 3, 4) if i != 12]  # major, then compatible brands
    return any(brand in HEVC_IMAGE_BRANDS for brand in brands)


def pixels_of(data: bytes) -> int:
    """Width x height from the image's header (nothing decoded): what decoding it will cost."""
    image = _readable(data, lambda: _open(data))
    return image.size[0] * image.size[1]


def decode(data: bytes) -> np.ndarray:
    """Encoded bytes -> grayscale float32 [H,W] in [0,1], at most WORKING_SIDE on its longer side;
    refuses non-images and oversized ones."""
    return _readable(data, lambda: _flatten(_working_size(eight_bit(_upright(_open(data))))))


def _upright(image: Image.Image) -> Image.Image:
    """The image decoded (a JPEG at reduced scale when it is large) and turned upright, as the
    camera was held (phones store photos sideways with an EXIF orientation)."""
    draft_within(image, "L", WORKING_SIDE)
    ImageOps.exif_transpose(image, in_place=True)  # decodes (at the draft's scale), then turns
    return image


def draft_within(image: Image.Image, mode: str, side: int) -> None:
    """Have a JPEG decode (when it is) in ``mode`` at the smallest scale that keeps its longer side
    at least ``side``; other formats decode whole.

    The size asked keeps the photo's shape: Pillow takes the smallest scale that leaves both sides
    at least the size asked, so a square decoded a 1024x768 photo (what resserve's clients and its
    page send of a larger one) whole, then reduced it: 2.2-2.3 ms here, against 1.7 ms at half scale."""
    width, height = image.size
    longer = max(width, height, 1)
    image.draft(mode, (max(1, width * side // longer), max(1, height * side // longer)))


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images as 8-bit grayscale over their range: 16-bit over
    0-65535, as the format defines it; the others, which have no fixed range, over the range the
    image uses. Pillow's ``convert("L")`` clips them at 255 instead, which turns a 16-bit scan of
    dark ink on white paper all white. Worked in place, and floats reduced first: a 16-megapixel
    image costs at most one copy of its pixels beside Pillow's own."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.array(image)  # uint16 (in the file's byte order), a copy to work in
        np.right_shift(values, 8, out=values)  # 257 * v -> v: an 8-bit image stored as 16 bits comes back exact
        return Image.fromarray(values.astype(np.uint8))
    if image.mode not in UNBOUNDED_MODES:
        return image
    values = np.array(_working_size(image), dtype=np.float32)  # 4 bytes a pixel: reduced first where large
    if not np.isfinite(values).all():
        raise InvalidInput("the image holds NaN or infinite pixel values")
    low, high = values.min(), values.max()
    values -= low
    values *= 255.0 / (high - low) if high > low else 0.0
    return Image.fromarray(np.rint(values, out=values).astype(np.uint8))  # 2-D uint8: mode L


def _working_size(image: Image.Image) -> Image.Image:
    """Shrink big images early (box-reduce once decoded), so the float work below costs the same
    for a 4000x4000 scan as for a 512x512 drawing."""
    factor = -(-max(image.size) // WORKING_SIDE)
    if factor <= 1:
        return image
    if image.mode not in ("L", "LA", "RGB", "RGBA", *UNBOUNDED_MODES):  # the modes Image.reduce takes
        image = image.convert("LA" if has_alpha(image) else "L")
    return image.reduce(factor)


def has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` carries transparency: an alpha band, or a transparent colour or palette entry."""
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def _flatten(image: Image.Image) -> np.ndarray:
    """Grayscale float32 [H,W] in [0,1]; transparent pixels take the background opposite to the ink."""
    if not has_alpha(image) or _opaque(image):
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    gray_alpha = np.asarray(image.convert("LA"), dtype=np.float32) / 255.0
    gray, alpha = gray_alpha[..., 0], gray_alpha[..., 1]
    if alpha.min() >= 1.0:
        return gray
    covered = alpha.sum()
    ink_is_dark = covered == 0 or (gray * alpha).sum() / covered < 0.5
    background = 1.0 if ink_is_dark else 0.0
    return gray * alpha + background * (1.0 - alpha)


def _opaque(image: Image.Image) -> bool:
    """Whether an image with an alpha band has no transparent pixel, as a canvas's PNG (the page's
    drawings) has none: told from the band's extrema, not from floats of every pixel's grey and
    alpha (1.4 ms for a 280x280 drawing, against 0.2 ms for its grey alone)."""
    return image.mode in ("RGBA", "LA") and image.getchannel("A").getextrema()[0] == 255


class BlankImage(InvalidInput):
    """An image with no ink in it: there is no digit to classify."""


def _light_background(gray: np.ndarray, even: bool) -> bool:
    """Whether the background of ``gray`` is lighter than its ink. Where the border is one ``even``
    tone (drawings, scans, MNIST), it is the background: lighter when nearer the brightest value
    than the darkest. A photo's paper may be any tone, and more than one (``dark_ink``). The border
    was once compared with mid-grey, which a camera metering a white page may well make it: with
    the paper at half its brightness, 42 of 100 photographed digits read right, against 99 at 60%."""
    if even:
        return bool(border(gray).mean() > (gray.min() + gray.max()) / 2)
    return dark_ink(gray)


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """Grayscale [H,W] in [0,1] -> float32 [28,28] in [0,1], white ink on black, centred."""
    gray = on_the_sheet(gray)
    even = np.ptp(border(gray)) <= EVEN_BORDER  # one background tone; else uneven light, or a noisy photo
    if _light_background(gray, even):  # make the ink white
        gray = 1.0 - gray
    if not even:  # the paper, pixel by pixel
        gray = np.clip(gray - paper_light(gray), 0.0, None)
    gray = np.clip(gray - np.median(border(gray)), 0.0, None)  # background to 0
    peak = gray.max()
    if peak <= 0:
        return np.zeros((28, 28), dtype=np.float32)  # a blank image stays blank
    gray = without_specks(without_ruled_lines(gray / peak))
    if not gray.any():
        return np.zeros((28, 28), dtype=np.float32)  # nothing but the lines of the paper
    ink = gray > INK_THRESHOLD
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))  # np.nonzero: 5x the time
    crop = gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    scale = 20.0 / max(crop.shape)
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    small = np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize(size, Image.LANCZOS),
                       dtype=np.float32) / 255.0
    return _paste_centred(small)


def _paste_centred(digit: np.ndarray) -> np.ndarray:
    """Place ``digit`` (at most 20x20) in 28x28 so its centre of mass is at the centre."""
    canvas = np.zeros((28, 28), dtype=np.float32)
    total = digit.sum()
    ys, xs = np.indices(digit.shape)
    cy, cx = ((ys * digit).sum() / total, (xs * digit).sum() / total) if total > 0 else (digit.shape[0] / 2, digit.shape[1] / 2)
    top = int(np.clip(round(14 - cy), 0, 28 - digit.shape[0]))
    left = int(np.clip(round(14 - cx), 0, 28 - digit.shape[1]))
    canvas[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    return canvas


def encoded_to_input(data: bytes) -> np.ndarray:
    """Encoded image bytes -> the model input row float32 [1,28,28]; a blank image is refused."""
    digit = to_mnist(decode(data))
    if not digit.any():
        raise BlankImage("the image is blank (no ink found): there is no digit to classify")
    return digit[None]


def raw_to_input(data: bytes) -> np.ndarray:
    """784 raw uint8 bytes (MNIST layout) -> float32 [1,28,28] in [0,1]."""
    if len(data) != 784:
        raise InvalidInput(f"raw_28x28 must be 784 bytes (28x28 uint8), got {len(data)}")
    return (np.frombuffer(data, dtype=np.uint8).astype(np.float32) / 255.0).reshape(1, 28, 28)


def to_png(image: np.ndarray) -> bytes:
    """A model input ([1,28,28] or [28,28] floats in [0,1]) as a grayscale PNG: what the model saw."""
    pixels = np.clip(np.rint(image.reshape(28, 28) * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()
