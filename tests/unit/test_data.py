"""Data sources, bad data, caching, and resuming the loader mid-epoch."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from support import ROOT, run_cli
from lightning_distill import UserError
from lightning_distill.config.registry import REGISTRIES

WORDS = "a photo of red green blue cat dog square".split()


def _png(w, h, seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _make(role_name, **fields):
    from lightning_distill.config.fields import validate

    cls = REGISTRIES["data"].get(role_name)
    return cls(validate(fields, cls.Config), seed=0)


@pytest.fixture
def samples(tmp_path):
    """Six good samples as a folder and as two tar shards with the same files."""
    rng = np.random.default_rng(1)
    files = {f"s{i}": (_png(20 + 3 * i, 18 + i, i), " ".join(rng.choice(WORDS, 4))) for i in range(6)}
    folder = tmp_path / "folder"
    folder.mkdir()
    for key, (png, caption) in files.items():
        (folder / f"{key}.png").write_bytes(png)
        (folder / f"{key}.txt").write_text(caption)
    shards = []
    for n, keys in enumerate([["s0", "s1", "s2"], ["s3", "s4", "s5"]]):
        shard = tmp_path / f"shard-{n}.tar"
        with tarfile.open(shard, "w") as tar:
            for key in keys:
                for name, data in ((f"{key}.png", files[key][0]), (f"{key}.txt", files[key][1].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(shard)
    return {"folder": folder, "shards": shards, "files": files, "tmp": tmp_path}


def _assert_same_items(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"]
        assert torch.equal(x["pixels"], y["pixels"]) and torch.equal(x["time_ids"], y["time_ids"])


def test_folder_and_tar_shards_yield_identical_items(samples):
    folder = _make("image_folder", root=str(samples["folder"]), resolution=16)
    tars = _make("tar_shards", shards=[str(samples["tmp"] / "shard-*.tar")], resolution=16)
    assert len(folder) == 6
    _assert_same_items(folder, tars)
    item = folder[1]
    assert item["pixels"].shape == (3, 16, 16) and -1 <= item["pixels"].min() and item["pixels"].max() <= 1
    # micro-conditioning: original (h, w), crop top-left, target size
    h, w = 19, 23
    scale = 16 / min(h, w)
    nw = round(w * scale)
    assert item["time_ids"].tolist() == [h, w, 0, (nw - 16) // 2, 16, 16]


def test_metadata_jsonl_captions_and_random_crops(samples):
    folder = samples["folder"]
    for p in folder.glob("*.txt"):
        p.unlink()
    rows = [{"file_name": f"{k}.png", "text": c} for k, (_, c) in samples["files"].items()]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = _make("image_folder", root=str(folder), resolution=16, crop="random")
    assert [ds[i]["caption"] for i in range(6)] == [c for _, c in samples["files"].values()]
    tops = {tuple(ds[i]["time_ids"][2:4].tolist()) for i in range(6)}
    assert len(tops) > 1  # random crops, yet deterministic per index:
    assert torch.equal(ds[5]["pixels"], ds[5]["pixels"])


def test_bad_files_are_skipped_and_counted(samples, caplog):
    folder = samples["folder"]
    (folder / "corrupt.png").write_bytes(b"not an image at all")
    (folder / "corrupt.txt").write_text("a cat")
    good = _png(24, 24, 99)
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "truncated.txt").write_text("a dog")
    (folder / "tiny.png").write_bytes(_png(8, 8, 5))
    (folder / "tiny.txt").write_text("a small cat")
    (folder / "nocaption.png").write_bytes(_png(24, 24, 6))
    ds = _make("image_folder", root=str(folder), resolution=16)
    assert len(ds) == 7  # the six good ones and the truncated one, whose header reads fine
    items = [ds[i] for i in range(len(ds))]  # decoding the truncated one fails: it gives way to the next
    assert all(it["pixels"].shape == (3, 16, 16) for it in items)
    report = ds.report()
    for piece in ["missing caption", "unreadable image", "smaller than 16 px", "truncated or corrupt", "nocaption.png"]:
        assert piece in report, report
    assert sum(ds.skipped.values()) == 4


def test_empty_or_missing_sources_exit_2_before_any_model_loads(cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe = ROOT / "recipes" / "sdxl_lightning" / "full.yaml"
    # the pretrained model does not exist either: the data error must come first
    common = ["fabric.accelerator=cpu", "fabric.devices=1", "fabric.strategy=auto",
              "method.teacher.pretrained=/nonexistent", "codec.pretrained=/nonexistent"]
    result = cli("train", str(recipe), "--out", str(tmp_path / "run"), f"data.root={empty}", *common)
    assert result.returncode == 2 and "no usable images" in result.stderr, result.stderr[-2000:]
    result = cli("train", str(recipe), "--out", str(tmp_path / "run"),
                 f"data={{name: tar_shards, shards: ['{tmp_path}/none-*.tar']}}", *common)
    assert result.returncode == 2 and "nothing matches" in result.stderr, result.stderr[-2000:]


def test_loader_resumed_mid_epoch_continues_at_the_same_sample():
    from lightning_distill.engine.loader import make_loader

    class Fabric:
        global_rank, world_size = 0, 1

    ds = list(range(10))
    whole = iter(make_loader(ds, batch_size=3, num_workers=0, seed=4, fabric=Fabric()))
    reference = [next(whole).tolist() for _ in range(9)]  # crosses two epoch boundaries
    for cut in (2, 3, 5):
        loader = make_loader(ds, batch_size=3, num_workers=0, seed=4, fabric=Fabric())
        it = iter(loader)
        head = [next(it).tolist() for _ in range(cut)]
        state = loader.state_dict()
        fresh = make_loader(ds, batch_size=3, num_workers=0, seed=4, fabric=Fabric())
        fresh.load_state_dict(state)
        it2 = iter(fresh)
        assert head + [next(it2).tolist() for _ in range(9 - cut)] == reference, cut
    assert len(set(sum(reference[:3], []))) == 9  # the first epoch's batches repeat no sample


@pytest.mark.slow  # about 40 s; the families' cache tests cover the cache in the default run
def test_cache_round_trip_gives_the_same_loss_as_images(tiny_sdxl, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_distill.config.recipe import load_recipe
    from support import fast_overrides

    recipe = ROOT / "recipes" / "sdxl_lightning" / "lora.yaml"
    # batch size 1 for caching and training alike: the VAE then sees the very same inputs in both runs (convolutions
    # over batches of other shapes may differ in the last bit, which a 1-step-vs-4-step loss near zero magnifies)
    args = fast_overrides(load_recipe(recipe).resolved, tiny_sdxl) + ["train.log_every=1", "train.batch_size=1"]
    one_phase = ["schedule.stages=[{name: s32, teacher_steps: 128, student_steps: 32, phases: [{kind: mse, steps: 2}]}]"]
    cache = tmp_path / "cache"
    made = run_cli("cache", str(recipe), "--out", str(cache), "--shard-size", "4", *args)
    assert made.returncode == 0, made.stderr[-3000:]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["total"] == 6 and [s["count"] for s in manifest["shards"]] == [4, 2]
    first = (cache / "shard-00000.safetensors").stat().st_mtime_ns
    (cache / "shard-00001.safetensors").unlink()  # as if killed before the last shard
    again = run_cli("cache", str(recipe), "--out", str(cache), "--shard-size", "4", *args)
    assert again.returncode == 0 and (cache / "shard-00001.safetensors").is_file()
    assert (cache / "shard-00000.safetensors").stat().st_mtime_ns == first  # finished shards are skipped

    losses = {}
    # from the cache with the text encoders off, as the 24 GB recipe trains
    for source, extra in (("images", []), ("cache", ["data={name: cached, root: " + str(cache) + "}", "codec.text_encoders=false"])):
        out = tmp_path / source
        result = run_cli("train", str(recipe), "--out", str(out), *args, *one_phase, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        acc = EventAccumulator(str(out / "tensorboard"))
        acc.Reload()
        losses[source] = [e.value for e in acc.Scalars("s32-mse/loss/mse")]
    assert len(losses["images"]) == 2
    assert np.allclose(losses["images"], losses["cache"], rtol=1e-5, atol=0), losses


def test_unfinished_cache_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"complete": False, "shards": []}))
    with pytest.raises(UserError, match="unfinished"):
        _make("cached", root=str(tmp_path))


def test_tar_keys_follow_webdataset_rules(tmp_path):
    """Keys are the path up to the first dot of the file name: dotted folders and ./ prefixes stay intact."""
    shard = tmp_path / "dotted.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("./dir.v1/a.png", _png(20, 20, 1)), ("./dir.v1/a.txt", b"a red cat"),
                           ("dir.v1/b.png", _png(20, 20, 2)), ("dir.v1/b.json", json.dumps({"caption": "a dog"}).encode()),
                           ("dir.v1/c.txt", b"a caption without an image"),
                           ("dir.v1/d.png", _png(20, 20, 3)), ("dir.v1/d.txt", b"\xff\xfe not utf-8")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = _make("tar_shards", shards=[str(shard)], resolution=16)
    assert [r.key for r in ds.records] == ["dir.v1/a", "dir.v1/b"]
    assert [ds[i]["caption"] for i in range(2)] == ["a red cat", "a dog"]
    report = ds.report()
    assert "no image" in report and "missing caption" in report  # c has no image; d's caption is unreadable


def test_compressed_shards_are_a_clear_error(tmp_path):
    shard = tmp_path / "x.tar.gz"
    with tarfile.open(shard, "w:gz") as tar:
        info = tarfile.TarInfo("a.png")
        data = _png(20, 20, 1)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match="uncompressed"):
        _make("tar_shards", shards=[str(shard)], resolution=16)


class _Spec:
    def __init__(self, obj, d):
        self.obj, self.d = obj, d

    def build(self, **_):
        return self.obj

    def to_dict(self):
        return self.d


def _cache_codec(extra: bool = False):
    """A codec whose conditioning is text, pooled and time_ids, and with ``extra`` an attention mask and size
    inputs as well, each row telling its caption apart."""
    from lightning_distill.codecs.base import Codec as CodecBase

    class Codec(CodecBase):
        has_text = True

        def encode(self, pixels):
            return pixels[:, :1, ::4, ::4]

        def caption_conditioning(self, captions, height, width, device, time_ids=None):
            n = len(captions)
            length = torch.tensor([float(len(c)) for c in captions])
            cond = {"text": length[:, None, None].expand(n, 2, 3).clone(), "pooled": torch.zeros(n, 3),
                    "time_ids": time_ids if time_ids is not None else torch.zeros(n, 6)}
            if extra:
                cond["mask"] = (torch.arange(4)[None] < length[:, None] % 4 + 1).long()
                cond["sizes"] = torch.tensor([[float(height), float(width)]]).expand(n, 2).clone()
            return cond

    return Codec()


def _cache_recipe(dataset, with_codec=None):
    chosen = with_codec or _cache_codec()

    class Recipe:
        seed = 0
        data = _Spec(dataset, {"name": "image_folder"})
        codec = _Spec(chosen, {"name": "test"})
        train = type("T", (), {"batch_size": 2})

    return Recipe


def test_a_cache_of_other_settings_is_not_resumed(samples, tmp_path):
    from lightning_distill.data.cache import build_cache

    Recipe = _cache_recipe(_make("image_folder", root=str(samples["folder"]), resolution=16))
    out = tmp_path / "cache"
    assert build_cache(Recipe, out, shard_size=4)["total"] == 6
    with pytest.raises(UserError, match="other data, codec or shard size"):
        build_cache(Recipe, out, shard_size=3)
    (out / "shard-00001.safetensors").write_bytes(b"cut short")  # a damaged shard is encoded again
    assert build_cache(Recipe, out, shard_size=4)["total"] == 6


def test_cache_skips_a_corrupt_image_and_never_stores_another_twice(samples, tmp_path):
    from safetensors.torch import load_file

    from lightning_distill.data.cache import build_cache

    folder = samples["folder"]
    good = _png(24, 24, 99)
    (folder / "s2.png").write_bytes(good[: len(good) // 2])  # a header that reads, pixels that do not
    dataset = _make("image_folder", root=str(folder), resolution=16)
    assert len(dataset) == 6  # the header scan lets it through; decoding fails later
    out = tmp_path / "cache"
    manifest = build_cache(_cache_recipe(dataset), out, shard_size=4)
    assert manifest["total"] == 5
    latents = torch.cat([load_file(str(out / s["file"]))["latents"] for s in manifest["shards"] if s["count"]])
    assert latents.shape[0] == 5
    assert len({row.numpy().tobytes() for row in latents}) == 5  # no sample stored twice
    assert "1 truncated or corrupt image" in manifest["skipped"] and "s2.png" in manifest["skipped"]
    # a resumed cache keeps the count of what it skipped in its finished shards
    (out / "manifest.json").unlink()
    again = build_cache(_cache_recipe(_make("image_folder", root=str(folder), resolution=16)), out, shard_size=4)
    assert again["total"] == 5 and "1 truncated or corrupt image" in again["skipped"], again["skipped"]


def test_training_counts_a_substituted_sample(samples):
    folder = samples["folder"]
    good = _png(24, 24, 99)
    (folder / "s2.png").write_bytes(good[: len(good) // 2])
    dataset = _make("image_folder", root=str(folder), resolution=16)
    item = dataset[2]  # gives way to the next sample, and says so
    assert torch.equal(item["pixels"], dataset[3]["pixels"])
    assert dataset.skipped["truncated or corrupt image"] >= 1 and "s2.png" in dataset.report()


def test_metadata_rows_naming_missing_files_are_counted_and_named(samples):
    folder = samples["folder"]
    for p in folder.glob("*.txt"):
        p.unlink()
    rows = [{"file_name": f"{k}.png", "text": c} for k, (_, c) in samples["files"].items()]
    rows += [{"file_name": "gone.png", "text": "a cat"}, {"file_name": "sub/also-gone.jpg", "text": "a dog"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = _make("image_folder", root=str(folder), resolution=16)
    assert len(ds) == 6
    report = ds.report()
    assert "2 missing file named in metadata.jsonl" in report and "gone.png" in report, report
    assert sum(ds.skipped.values()) == 2


def test_tar_shards_count_corrupt_images_missing_images_and_duplicate_keys(samples, tmp_path):
    good = _png(24, 24, 7)
    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [("a.png", good), ("a.txt", b"a cat"), ("a.png", _png(24, 24, 8)),  # key 'a' twice
                           ("b.txt", b"a dog"),  # caption without image
                           ("c.png", good[: len(good) // 2]), ("c.txt", b"a cut image"), ("d.png", good), ("d.txt", b"ok")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = _make("tar_shards", shards=[str(shard)], resolution=16)
    _ = [ds[i] for i in range(len(ds))]
    report = ds.report()
    for piece in ["duplicate key", "bad.tar:a", "no image", "truncated or corrupt image", "c.png"]:
        assert piece in report, report


def test_images_of_every_mode_become_the_rgb_they_show(tmp_path):
    from lightning_distill.data.images import to_rgb

    def reopened(im, fmt="PNG", **kw):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return Image.open(io.BytesIO(buf.getvalue()))

    grey16 = reopened(Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)))  # 16-bit mid grey
    assert grey16.mode.startswith("I") and np.asarray(to_rgb(grey16)).tolist() == np.full((8, 8, 3), 128).tolist()
    clear = Image.new("RGBA", (8, 8), (10, 200, 30, 0))  # fully transparent green: shows white
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert (np.asarray(to_rgb(reopened(clear))) == 255).all()
    assert abs(int(np.asarray(to_rgb(reopened(half)))[0, 0, 0]) - 127) <= 1
    palette = Image.new("P", (8, 8), 3)
    palette.putpalette([0, 0, 0] * 3 + [250, 0, 0] + [0, 0, 0] * 252)
    assert np.asarray(to_rgb(reopened(palette))).tolist()[0][0] == [250, 0, 0]
    assert (np.asarray(to_rgb(reopened(palette, transparency=3))) == 255).all()
    cmyk = reopened(Image.new("CMYK", (8, 8), (0, 255, 0, 0)), "JPEG", quality=100)
    assert cmyk.mode == "CMYK" and np.abs(np.asarray(to_rgb(cmyk)).astype(int) - [255, 0, 255]).max() <= 2


def test_a_cache_of_nothing_decodable_is_an_error_that_leaves_no_folder(samples, tmp_path):
    from lightning_distill.data.cache import build_cache

    folder = tmp_path / "cut"
    folder.mkdir()
    good = _png(24, 24, 99)
    (folder / "a.png").write_bytes(good[: len(good) // 2])  # passes the header scan, fails to decode
    (folder / "a.txt").write_text("a cat")
    out = tmp_path / "cache"
    with pytest.raises(UserError, match="no sample of the data could be decoded.*a.png"):
        build_cache(_cache_recipe(_make("image_folder", root=str(folder), resolution=16)), out, shard_size=4)
    assert not out.exists()


def test_the_cache_keeps_every_key_the_codec_gives_and_refuses_a_codec_it_lacks(samples, tmp_path):
    """A codec that also gives a mask and size inputs: the cache stores them and the cached data set gives them back
    row for row; a cache made without them is refused, naming the keys, when the recipe's codec gives them."""
    from torch.utils.data import default_collate

    from lightning_distill.codecs.base import batch_conditioning
    from lightning_distill.data.cache import Cached, build_cache

    dataset = _make("image_folder", root=str(samples["folder"]), resolution=16)
    codec = _cache_codec(extra=True)
    out = tmp_path / "cache"
    manifest = build_cache(_cache_recipe(dataset, codec), out, shard_size=4)
    assert manifest["keys"] == ["latents", "mask", "pooled", "sizes", "text", "time_ids"]
    cached = Cached(Cached.Config(root=str(out)))
    cached.check_codec(codec)  # it holds all the codec gives
    for i in range(len(cached)):
        row, item = cached[i], dataset[i]
        assert set(row) == set(manifest["keys"])
        expected = codec.caption_conditioning([item["caption"]], 16, 16, "cpu", item["time_ids"][None])
        for key, value in expected.items():
            assert torch.equal(row[key], value[0]), key
    cond = batch_conditioning(default_collate([cached[0], cached[1]]), codec)
    assert {"mask", "sizes", "text", "pooled", "time_ids"} <= set(cond)  # what the network is given
    plain = tmp_path / "plain"
    build_cache(_cache_recipe(_make("image_folder", root=str(samples["folder"]), resolution=16)), plain, shard_size=4)
    with pytest.raises(UserError, match="lacks mask, sizes"):
        Cached(Cached.Config(root=str(plain))).check_codec(codec)
