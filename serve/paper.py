"""The paper a digit is written on, taken away from a photo of it so that the digit is left:
the desk around a sheet, uneven light across it, and specks apart from the digit (the lines of
ruled paper: serve/ruled.py). Each step leaves a drawing, a scan or an MNIST digit as it is.

A photo of a digit on paper is rarely lit evenly: a shadow across the page, or corners darker
than the centre, leave paper in one place darker than ink in another, so no single level tells
them apart (with 40% of the light gone on one side of the page, the shipped model read 9 of 40
photographed digits right, against 39 under even light). Where the border is not one even
tone, the paper's brightness is estimated at every pixel (``paper_light``) and taken away before
the ink is looked for; an even one (a drawing, a scan, MNIST itself) is taken away whole. For the
same reason, whether a photo's ink is darker than its paper is told against the paper around each
part of it (``dark_ink``), not against one level.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

INK_THRESHOLD = 0.25  # fraction of the darkest-to-brightest range that counts as ink
PAPER_SIDE = 32  # the paper is estimated at this resolution: light varies slowly across a page
PAPER_WINDOW = 13  # pixels of it (40% of the side) that are wider than any stroke, so no ink is taken for paper
PAPER_AROUND = 5  # pixels of it (15% of the side) around each one, mostly paper wherever a digit's strokes are
SHADOW_EDGE = 0.1  # the light changes this much from one cell to the next at a sharp shadow's edge
SHEET_WINDOW = 3  # pixels of it (10% of the side): wider than a stroke, narrower than a sheet of paper in a photo
SHEET_CONTRAST = 0.3  # a sheet is at least this much brighter than the desk around it
SHEET_SHARE = 0.1  # and covers at least this share of the photo
SHEET_SIDE = 0.25  # and is at least this share of the photo's side across and down
SHEET_PAPER = 0.8  # of which at least this share is bright paper (the ink on it is thin)
DESK_EVEN = 0.2  # nothing on a desk is this share of that contrast darker than the desk (ink on paper in shadow is)
SHEET_GRAIN = 1 / 255  # a photo's border: a desk's grain and the sensor's noise spread its quartiles this far
MARK_GRID = 32  # separate marks are told apart on a grid of at most this many cells a side,
MARK_CELL = 2  # each cell at least this many pixels a side (a 28x28 digit: 14x14 cells)
MARK_SHARE = 0.05  # a band of ink with less than this share of the inkiest band's is specks, not the digit


def border(gray: np.ndarray) -> np.ndarray:
    """The pixels along the image's four edges."""
    return np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])


def _coarse(gray: np.ndarray) -> np.ndarray:
    """``gray`` box-reduced to ``PAPER_SIDE`` square."""
    return np.asarray(Image.fromarray(gray.astype(np.float32), mode="F").resize((PAPER_SIDE,) * 2, Image.BOX))


def on_the_sheet(gray: np.ndarray) -> np.ndarray:
    """The part of ``gray`` on the sheet of paper, where it is a photo of a sheet lying on a darker
    desk (or table, or floor), all of it in the photo or not; ``gray`` itself otherwise.

    The desk was taken for ink (a dark desk around a sheet filling 70% of the photo's side: 18 of
    200 digits read right; the same sheet running out of the photo at the bottom: 18). A sheet is
    looked for in photos only (a grainy border; drawings and MNIST have one tone there, but where
    a stroke reaches it) whose border is mostly dark: with less of it dark, the light background
    is taken for paper, and a desk beside it is taken away with the uneven light (paper_light).
    On a coarse grid, the desk is what is much darker than the paper and wider than any stroke
    (a grey opening keeps it and takes strokes away), the sheet what is brighter and as wide; the
    sheet must cover SHEET_SHARE of the photo, and the desk hold no ink (a shadow over the page
    may). The part kept is a box a cell inside the sheet's edges, with no corner of the desk in it
    when the sheet lies at a slant, and the lines of ruled paper reach its sides; it must be
    SHEET_SIDE of the photo across and down and SHEET_PAPER bright, which a bold white digit on a
    dark board is not (its strokes, or the ring of a 0 with its hole, passed the rest: 151 of 200
    such digits read right without these two checks, 199 with them)."""
    box = _sheet(gray)
    if box is None:
        return gray
    top, bottom, left, right = box
    cell_height, cell_width = gray.shape[0] / PAPER_SIDE, gray.shape[1] / PAPER_SIDE
    rows = slice(round(top * cell_height), round(bottom * cell_height))
    return gray[rows, round(left * cell_width):round(right * cell_width)]


def _sheet(gray: np.ndarray) -> tuple[int, int, int, int] | None:
    """Top, bottom, left and right (exclusive) on the ``PAPER_SIDE`` grid of the box on the sheet
    ``gray`` shows, if it shows one (see ``on_the_sheet``); None otherwise."""
    tones = np.sort(border(gray))
    low, middle, high = tones[[len(tones) // 4, len(tones) // 2, len(tones) * 3 // 4]]  # np.percentile is slower
    if high - low < SHEET_GRAIN or middle > 1 - SHEET_CONTRAST:
        return None  # no grain, or no desk dark enough: nearly every image, at the cost of a look at its border
    small = _coarse(gray)
    desk, paper = np.median(border(small)), np.quantile(small, 1 - SHEET_SHARE / 2)
    if paper - desk < SHEET_CONTRAST:
        return None
    bright = (small > (desk + paper) / 2).astype(np.float32)
    sheet = _enclosed(_opened(bright, SHEET_WINDOW) > 0)
    on_the_desk = (_opened(1 - bright, SHEET_WINDOW) > 0) & ~sheet  # not the ink on the sheet: it is enclosed
    if sheet.mean() < SHEET_SHARE or not _a_desk(small, on_the_desk, desk, paper):
        return None
    box = _box_within(_window(sheet, np.min, 3))
    if box is None:
        return None
    top, bottom, left, right = box
    if min(bottom - top, right - left) < SHEET_SIDE * PAPER_SIDE or bright[top:bottom, left:right].mean() < SHEET_PAPER:
        return None  # a bold white stroke, or a ring of one: too thin, or not mostly bright inside
    return box


def _a_desk(small: np.ndarray, on_the_desk: np.ndarray, desk: float, paper: float) -> bool:
    """Whether the cells ``on_the_desk`` are a desk: there are some, and none is much darker than
    the desk (DESK_EVEN of its contrast with the paper), as ink is on paper under a shadow: a sharp
    shadow on three sides of a page, over the digit's edges, cut off as a desk, read 181 of 200
    digits right, against 193 with the shadow left to ``paper_light``."""
    return bool(on_the_desk.any()) and not (small[on_the_desk] < desk - DESK_EVEN * (paper - desk)).any()


def _box_within(region: np.ndarray) -> tuple[int, int, int, int] | None:
    """Top, bottom, left and right (exclusive) of a box that lies within ``region``: its bounding
    box, cut from the side with the most cells outside it until none is; None if none is found."""
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if not len(rows):
        return None
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    while top < bottom and left < right:
        box = ~region[top:bottom, left:right]
        outside = [box[0].sum(), box[-1].sum(), box[:, 0].sum(), box[:, -1].sum()]
        side = int(np.argmax(outside))
        if outside[side] == 0:
            return top, bottom, left, right
        top, bottom, left, right = (top + (side == 0), bottom - (side == 1), left + (side == 2), right - (side == 3))
    return None


def _enclosed(region: np.ndarray) -> np.ndarray:
    """``region`` with what lies between its ends across or down: a sheet with the ink on it, which
    the opening may have joined to its edge (a convex region, as a sheet is, gains nothing else)."""
    outside = ~region
    beyond_across = np.logical_and.accumulate(outside, axis=1) | _from_the_end(outside, axis=1)
    beyond_down = np.logical_and.accumulate(outside, axis=0) | _from_the_end(outside, axis=0)
    return ~(beyond_across & beyond_down)


def _from_the_end(outside: np.ndarray, axis: int) -> np.ndarray:
    """Whether everything from each cell to the last along ``axis`` is ``outside``."""
    return np.flip(np.logical_and.accumulate(np.flip(outside, axis), axis=axis), axis)


def dark_ink(gray: np.ndarray) -> bool:
    """Whether the ink in a photo ``gray`` is darker than its paper: whether, on a ``PAPER_SIDE``
    grid, the cells are darker on the whole than the median of the PAPER_AROUND cells around each,
    which is the paper there, whatever its light (ink is a minority anywhere; a shadow's edge departs
    from it one way on one side and the other way on the other). The border alone misled where
    the light falls off towards the photo's edges: a flash's pool of light with its corners at 10%
    of the middle's light read 8 of 100 digits right, the border compared with mid-grey or with
    the middle of the image's range; with the corners at 40%, 28 of 100 by the latter."""
    small = _coarse(gray)
    padded = np.pad(small, PAPER_AROUND // 2, mode="edge")
    cells = np.lib.stride_tricks.sliding_window_view(padded, (PAPER_AROUND,) * 2).reshape(*small.shape, -1)
    around = np.partition(cells, cells.shape[-1] // 2, axis=-1)[..., cells.shape[-1] // 2]  # the median, 4x as fast
    return bool(around.mean() > small.mean())


def paper_light(gray: np.ndarray) -> np.ndarray:
    """The background's brightness at each pixel of ``gray`` (white ink on a darker background):
    a grey-level opening (the lowest value in a window, then the highest of those), which takes
    away every stroke narrower than the window and keeps the slow variations of light, on a
    ``PAPER_SIDE`` square copy, then brought back to full size smoothly. Where it steps by
    SHADOW_EDGE or more from a cell to the next (the sharp edge of a shadow), each pixel takes the
    lowest or the highest level around its cell, whichever is nearer its own: brought to full
    size smoothly, the step fell a cell wide on both sides of the edge, and the paper along it
    read as a line of ink (a shadow's edge across the digit: 80 of 200 digits read right, 198 now)."""
    opened = _opened(_coarse(gray), PAPER_WINDOW)
    if max(np.abs(np.diff(opened, axis=axis)).max(initial=0) for axis in (0, 1)) < SHADOW_EDGE:
        return _full_size(opened, gray.shape)
    low, high = (_full_size(_window(opened, reduce, 3), gray.shape) for reduce in (np.min, np.max))
    return np.where(gray + gray > low + high, high, low)


def _full_size(small: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``small`` brought to ``shape`` by bilinear interpolation."""
    return np.asarray(Image.fromarray(small, mode="F").resize(shape[::-1], Image.BILINEAR))


def _opened(image: np.ndarray, window: int) -> np.ndarray:
    """A grey-level opening: the lowest value in a ``window`` square around each pixel, then the
    highest of those, which takes away everything bright narrower than the window. Both are taken
    over the image extended by its edge values, so that light still changing at an edge (a shadow
    deepening off the page) is followed up to it; the highest of lowest values cut off at the
    edge stopped half a window short, and the paper there read as ink (a soft shadow with 70% of
    the light gone at one side: 121 of 200 digits read right, against 199 under even light)."""
    eroded = _window(np.pad(image, window // 2, mode="edge"), np.min, window)
    return _reduced(eroded, np.max, window)


def _window(image: np.ndarray, reduce, window: int) -> np.ndarray:
    """``reduce`` (np.min, np.max) over a ``window`` square around each pixel, the image extended by
    its edge values."""
    return _reduced(np.pad(image, window // 2, mode="edge"), reduce, window)


def _reduced(image: np.ndarray, reduce, window: int) -> np.ndarray:
    """``reduce`` over each whole ``window`` square in ``image``, one axis at a time: ``window - 1``
    fewer rows and columns."""
    rows = reduce(np.lib.stride_tricks.sliding_window_view(image, window, axis=0), axis=-1)
    return reduce(np.lib.stride_tricks.sliding_window_view(rows, window, axis=1), axis=-1)


def without_specks(gray: np.ndarray) -> np.ndarray:
    """``gray`` (ink at most 1) without the marks apart from the digit that hold little ink (dust,
    a fleck of the pen, a crumb on the page): each would stretch the digit's bounding box to reach
    it, and the digit would shrink (three specks the size of a pen's dot around a photographed
    digit: 141 of 200 read right, against 199 without them).

    A mark that stretches the box lies beyond the digit's rows or beyond its columns, so it is
    found as documents' layouts are, by an XY cut: on a coarse grid of the ink, the rows (then
    the columns, and again until nothing changes) fall into bands of ink between empty ones; a
    band with less than MARK_SHARE of the inkiest band's ink is dropped. A gap of one cell does not
    part bands, so that the strokes of one digit, broken ones too, stay together."""
    cell = max(MARK_CELL, -(-max(gray.shape) // MARK_GRID))
    ink = _ink_per_cell(gray > INK_THRESHOLD, cell)
    rows, cols = np.ones(ink.shape[0], dtype=bool), np.ones(ink.shape[1], dtype=bool)
    while True:
        kept_rows = rows & _inky_bands((ink * rows[:, None] * cols).sum(axis=1))
        kept_cols = cols & _inky_bands((ink * kept_rows[:, None] * cols).sum(axis=0))
        if (kept_rows == rows).all() and (kept_cols == cols).all():
            break
        rows, cols = kept_rows, kept_cols
    if rows.all() and cols.all():
        return gray
    keep = np.repeat(np.repeat(rows[:, None] & cols, cell, axis=0), cell, axis=1)
    gray = gray * keep[:gray.shape[0], :gray.shape[1]]
    return gray / gray.max()


def _inky_bands(profile: np.ndarray) -> np.ndarray:
    """Which cells of ``profile`` (ink per row or column of cells) belong to a band holding at least
    MARK_SHARE of the inkiest band's ink; bands are parted by two or more empty cells."""
    inked = profile > 0
    inked[1:-1] |= inked[:-2] & inked[2:]  # a gap of one cell is bridged
    band = np.cumsum(np.diff(inked.astype(np.int8), prepend=0) == 1) * inked  # 1, 2, ... per band; 0 between
    band_ink = np.bincount(band, weights=profile)
    band_ink[0] = 0.0
    return band_ink[band] >= MARK_SHARE * band_ink.max()


def _ink_per_cell(ink: np.ndarray, cell: int) -> np.ndarray:
    """How many pixels of ``ink`` each ``cell``-pixel square holds (those at the edges may be smaller)."""
    per_row = np.add.reduceat(ink, np.arange(0, ink.shape[0], cell), axis=0, dtype=np.int32)
    return np.add.reduceat(per_row, np.arange(0, ink.shape[1], cell), axis=1)
