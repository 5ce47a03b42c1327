"""The tiny shapes world: deterministic, captions and images agree with the attributes, held-out pairs apart."""

from __future__ import annotations

import torch

from lightning_distill.worlds.shapes.world import COLORS, HELD_OUT, KINDS, POSITIONS, SIZES, WHERE, Shapes


def test_the_world_is_deterministic_from_its_seed():
    a, b = Shapes(Shapes.Config(size=20), seed=3), Shapes(Shapes.Config(size=20), seed=3)
    c = Shapes(Shapes.Config(size=20), seed=4)
    for i in range(20):
        assert torch.equal(a[i]["pixels"], b[i]["pixels"]) and a[i]["caption"] == b[i]["caption"]
    assert any(not torch.equal(a[i]["pixels"], c[i]["pixels"]) for i in range(20))


def test_captions_name_the_attributes_in_varied_wording():
    world = Shapes(Shapes.Config(size=300))
    wordings = set()
    for i in range(300):
        item = world[i]
        color, kind, position, size = (list(d)[k] for d, k in zip((COLORS, KINDS, POSITIONS, SIZES), item["attributes"]))
        text = item["caption"]
        assert color in text and kind in text and size in text and WHERE[position] in text, (text, color, kind)
        wordings.add(text.replace(color, "C").replace(kind, "K").replace(size, "S").replace(WHERE[position], "W"))
    assert len(wordings) >= 4


def test_images_show_the_attributes():
    world = Shapes(Shapes.Config(size=120))
    palette = torch.tensor(list(COLORS.values()))
    for i in range(120):
        item = world[i]
        color_i, kind_i, position_i, size_i = item["attributes"].tolist()
        image = (item["pixels"] + 1) / 2
        mask = image.max(0).values > 0.4  # the shape is bright, the background dark
        assert mask.any()
        mean = image[:, mask].mean(1)
        assert int(((palette - mean) ** 2).sum(1).argmin()) == color_i  # its colour is the named one
        ys, xs = torch.nonzero(mask, as_tuple=True)
        cx, cy = xs.float().mean() / 31, ys.float().mean() / 31
        px, py = list(POSITIONS.values())[position_i]
        assert abs(cx - px) < 0.12 and abs(cy - py) < 0.15, (cx, cy, px, py)
    small = [world[i]["pixels"] for i in range(120) if world[i]["attributes"][3] == 0]
    large = [world[i]["pixels"] for i in range(120) if world[i]["attributes"][3] == 1]
    area = lambda xs: sum(float(((x + 1) / 2).max(0).values.gt(0.4).sum()) for x in xs) / len(xs)  # noqa: E731
    assert area(large) > 2 * area(small)


def test_held_out_pairs_are_kept_out_of_training():
    train = Shapes(Shapes.Config(size=500, split="train"))
    held = Shapes(Shapes.Config(size=100, split="heldout"))
    pair = lambda item: (list(COLORS)[item["attributes"][0]], KINDS[item["attributes"][1]])  # noqa: E731
    assert not any(pair(train[i]) in HELD_OUT for i in range(500))
    assert all(pair(held[i]) in HELD_OUT for i in range(100))
