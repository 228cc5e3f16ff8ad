"""A grid-aligned procedural world: 3x3 cells of 16 px, at most one object per cell.

An object has a shape, a colour and a pattern — words the vocabulary has — and
a notch in one corner, which has no word: a description in words cannot tell
two objects apart that differ only in the notch, the pixels can. One cell is
exactly one image patch of the miniature vision tower (patch 16), so each
image token sees one whole object. Everything is deterministic in a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
PATTERNS = ("plain", "striped", "dotted")
NOTCHES = (0, 1, 2, 3)  # corner: top-left, top-right, bottom-left, bottom-right (no word)
POSITIONS = ("top left", "top middle", "top right", "middle left", "centre", "middle right",
             "bottom left", "bottom middle", "bottom right")
CELL = 16
GRID = 3
SIZE = CELL * GRID
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
       "purple": (150, 60, 190), "orange": (240, 140, 30)}
BACKGROUND = (235, 235, 235)


@dataclass(frozen=True, order=True)
class Obj:
    shape: str
    colour: str
    pattern: str
    notch: int

    def variants(self) -> dict[str, list["Obj"]]:
        """Objects differing from this one in exactly one attribute, by attribute."""
        out = {"shape": [], "colour": [], "pattern": [], "notch": []}
        for s in SHAPES:
            if s != self.shape:
                out["shape"].append(Obj(s, self.colour, self.pattern, self.notch))
        for c in COLOURS:
            if c != self.colour:
                out["colour"].append(Obj(self.shape, c, self.pattern, self.notch))
        for p in PATTERNS:
            if p != self.pattern:
                out["pattern"].append(Obj(self.shape, self.colour, p, self.notch))
        for n in NOTCHES:
            if n != self.notch:
                out["notch"].append(Obj(self.shape, self.colour, self.pattern, n))
        return out


ALL_OBJECTS = tuple(Obj(s, c, p, n) for s in SHAPES for c in COLOURS for p in PATTERNS for n in NOTCHES)


@dataclass(frozen=True)
class Scene:
    cells: tuple[Obj | None, ...]  # GRID*GRID, row-major

    def objects(self) -> list[Obj]:
        return [o for o in self.cells if o is not None]

    def render(self) -> Image.Image:
        img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
        img[:] = BACKGROUND
        for i, obj in enumerate(self.cells):
            if obj is not None:
                r, c = divmod(i, GRID)
                img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = draw(obj)
        return Image.fromarray(img)


def _shape_mask(shape: str) -> np.ndarray:
    y, x = np.mgrid[0:CELL, 0:CELL] + 0.5
    cy = cx = CELL / 2
    if shape == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= 6.5 ** 2
    if shape == "square":
        return (abs(y - cy) <= 6) & (abs(x - cx) <= 6)
    if shape == "triangle":
        return (y >= 2) & (y <= 14) & (abs(x - cx) <= (y - 2) * 0.55)
    if shape == "diamond":
        return abs(y - cy) + abs(x - cx) <= 7
    raise ValueError(f"shape={shape!r}")


_MASKS = {s: _shape_mask(s) for s in SHAPES}


def draw(obj: Obj) -> np.ndarray:
    """One cell (CELL, CELL, 3) holding `obj`."""
    cell = np.empty((CELL, CELL, 3), dtype=np.uint8)
    cell[:] = BACKGROUND
    colour = np.array(RGB[obj.colour], dtype=np.uint8)
    mask = _MASKS[obj.shape].copy()
    y, x = np.mgrid[0:CELL, 0:CELL]
    if obj.pattern == "striped":
        paint = mask & (y % 4 < 2)
        cell[mask] = 255
        cell[paint] = colour
    elif obj.pattern == "dotted":
        cell[mask] = colour
        cell[mask & (y % 4 == 1) & (x % 4 == 1)] = 255
    else:
        cell[mask] = colour
    r, c = divmod(obj.notch, 2)  # a dark 3x3 mark in one corner of the cell
    edge = (slice(0, 3), slice(CELL - 3, CELL))
    cell[edge[r], edge[c]] = (20, 20, 20)
    return cell


def random_scene(rng: random.Random, must: list[Obj] = (), n_objects: tuple[int, int] = (1, 4),
                 avoid: set[Obj] = frozenset(), pool: tuple[Obj, ...] = ALL_OBJECTS) -> Scene:
    """A scene with `must` objects and random others (never one in `avoid`), in random cells."""
    n = max(len(must), rng.randint(*n_objects))
    others = []
    while len(must) + len(others) < n:
        o = rng.choice(pool)
        if o not in avoid and o not in must and o not in others:
            others.append(o)
    objs = list(must) + others
    cells: list[Obj | None] = [None] * (GRID * GRID)
    for o, pos in zip(objs, rng.sample(range(GRID * GRID), len(objs))):
        cells[pos] = o
    return Scene(tuple(cells))
