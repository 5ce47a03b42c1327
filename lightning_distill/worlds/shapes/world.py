"""A tiny captioned image world made by code: 32×32 scenes of one coloured shape, with varied captions.

Everything is deterministic from ``(seed, index)``: attributes, jitter and wording. Some colour–kind pairs are
held out of the ``train`` split (``heldout`` has only them), to test whether students generalise like their
teacher. No file is read.

Captions come at two settings. ``full``: every caption names all four attributes, so the image given its caption
is nearly one picture. ``mixed``: a share of captions names only some attributes (``a red shape``, ``a circle on
the left``, ``a shape``), so the image given such a caption has several modes (the attributes left open), which
a regression-trained few-step student averages into blur; the item's ``mentioned`` flags say which were named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_distill.config.registry import DATA

COLORS = {
    "red": (0.9, 0.15, 0.15),
    "green": (0.15, 0.8, 0.2),
    "blue": (0.2, 0.3, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "magenta": (0.85, 0.2, 0.85),
    "cyan": (0.1, 0.85, 0.9),
}
KINDS = ("circle", "square", "triangle")
POSITIONS = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7), "center": (0.5, 0.5)}
SIZES = {"small": 0.12, "large": 0.22}
HELD_OUT = {("red", "triangle"), ("blue", "circle"), ("yellow", "square")}
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "center": "in the middle"}
TEMPLATES = (
    "a {size} {color} {kind} {where}",
    "a {color} {kind}, {size}, {where}",
    "there is a {size} {color} {kind} {where} of the picture",
    "{size} {color} {kind} {where}",
    "an image of a {color} {kind} that is {size}, {where}",
)


@dataclass(frozen=True)
class Scene:
    color: str
    kind: str
    position: str
    size: str

    def attributes(self) -> list[int]:
        """Class indices of (color, kind, position, size)."""
        return [list(COLORS).index(self.color), KINDS.index(self.kind), list(POSITIONS).index(self.position),
                list(SIZES).index(self.size)]


def all_scenes(split: str) -> list[Scene]:
    scenes = [Scene(c, k, p, s) for c in COLORS for k in KINDS for p in POSITIONS for s in SIZES]
    if split == "train":
        return [s for s in scenes if (s.color, s.kind) not in HELD_OUT]
    if split == "heldout":
        return [s for s in scenes if (s.color, s.kind) in HELD_OUT]
    return scenes


def render(scene: Scene, resolution: int, g: torch.Generator) -> Tensor:
    """``[3, R, R]`` in ``[-1, 1]``: the shape on a dark, slightly noisy background, with small jitter."""
    jitter = (torch.rand(4, generator=g) - 0.5) * torch.tensor([0.06, 0.06, 0.03, 0.1])
    cx, cy = POSITIONS[scene.position][0] + jitter[0], POSITIONS[scene.position][1] + jitter[1]
    r = SIZES[scene.size] + jitter[2]
    ys, xs = torch.meshgrid(torch.linspace(0, 1, resolution), torch.linspace(0, 1, resolution), indexing="ij")
    dx, dy = xs - cx, ys - cy
    if scene.kind == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif scene.kind == "square":
        inside = (dx.abs() <= r * 0.9) & (dy.abs() <= r * 0.9)
    else:  # an upward triangle with its base at cy + r
        inside = (dy <= r * 0.9) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.6)
    colour = torch.tensor(COLORS[scene.color]) * (1 + jitter[3])
    background = 0.08 + 0.04 * torch.rand(3, 1, 1, generator=g)
    image = background.expand(3, resolution, resolution).clone()
    image = torch.where(inside[None], colour[:, None, None].clamp(0, 1), image)
    image = image + 0.02 * torch.randn(image.shape, generator=g)
    return (image.clamp(0, 1) * 2 - 1).float()


PARTIAL_TEMPLATES = ("a {what}", "an image of a {what}", "there is a {what}", "{what}")
NOTHING = ("a shape", "something", "an image of a shape", "a picture")
CaptionMode = Literal["full", "mixed"]


def caption(scene: Scene, g: torch.Generator, mode: CaptionMode = "full", full_share: float = 0.5) -> tuple[str, list[bool]]:
    """A caption of ``scene`` and which of (color, kind, position, size) it names.

    ``full`` names all four. ``mixed`` names all four with probability ``full_share``, else each attribute with
    probability 1/2 (possibly none: "a shape").
    """
    template = TEMPLATES[int(torch.randint(len(TEMPLATES), (1,), generator=g))]
    if mode == "full":
        return template.format(color=scene.color, kind=scene.kind, where=WHERE[scene.position], size=scene.size), [True] * 4
    draws = torch.rand(5, generator=g)
    if float(draws[0]) < full_share:
        return template.format(color=scene.color, kind=scene.kind, where=WHERE[scene.position], size=scene.size), [True] * 4
    color, kind, position, size = (bool(d < 0.5) for d in draws[1:])
    pick = int(torch.randint(len(PARTIAL_TEMPLATES), (1,), generator=g))
    if not (color or kind or position or size):
        return NOTHING[pick % len(NOTHING)], [False] * 4
    words = [scene.size if size else "", scene.color if color else "", scene.kind if kind else "shape",
             WHERE[scene.position] if position else ""]
    return PARTIAL_TEMPLATES[pick].format(what=" ".join(w for w in words if w)), [color, kind, position, size]


@DATA.register("shapes")
class Shapes(Dataset):
    """The tiny shapes world: items ``pixels``, ``caption``, ``attributes`` (color, kind, position, size) and
    ``mentioned`` (which attributes the caption names)."""

    @dataclass(kw_only=True)
    class Config:
        size: int = 4096
        """Items (scenes repeat with different jitter and wording)."""
        resolution: int = 32
        split: Literal["train", "heldout", "all"] = "train"
        captions: CaptionMode = "full"
        """full: every caption names colour, kind, position and size. mixed: some captions name only some of
        them (a world where a caption leaves several modes open)."""
        full_share: float = 0.5
        """mixed: the share of captions that still name all four attributes."""

    def __init__(self, config: Config, *, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        self.scenes = all_scenes(config.split)

    def __len__(self) -> int:
        return self.config.size

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        scene = self.scenes[int(torch.randint(len(self.scenes), (1,), generator=g))]
        pixels = render(scene, self.config.resolution, g)
        text, mentioned = caption(scene, g, self.config.captions, self.config.full_share)
        return {"pixels": pixels, "caption": text, "attributes": torch.tensor(scene.attributes()),
                "mentioned": torch.tensor(mentioned)}
