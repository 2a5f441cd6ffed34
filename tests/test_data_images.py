"""Image shards and image batches: the Pillow backend (shapes, range, resize/crop geometry, ranks,
seeds, resumption, damaged samples), the shard builder, the loader factory, and — where NVIDIA
DALI is installed — the DALI backend against the Pillow one (skipped cleanly without DALI).

Tolerances for DALI vs Pillow: both backends decode, resize to the same planned size with an
antialiased triangle filter and edge replication, slice the same window and normalise with the
same torch code, so the only differences are in the resampler's integer rounding: at most 1 of
255 per pixel, i.e. ``2/255`` in [-1, 1]. That holds for JPEG too because DALI's CPU decoder
(nvImageCodec over libjpeg-turbo) and Pillow's (libjpeg-turbo) gave identical pixels for every
JPEG tried here (4:4:4 / 4:2:2 / 4:2:0, greyscale, EXIF-rotated); GPU decoding (nvJPEG) is not
covered by these tests. Bicubic / Lanczos kernels differ between the libraries: compared on
average only.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mfmegatron.data import (
    Manifest,
    PromptBatch,
    PromptShardReader,
    ShardReadWarning,
    ShardWriter,
    merge_state_dicts,
)
from mfmegatron.data.images import (
    ImageBatch,
    PILImageBatchLoader,
    build_image_loader,
    build_image_shards,
    plan_crop,
)
from mfmegatron.data.images.transforms import resize_crop
from tools.build_image_shards import main as build_main

SIZE = (16, 20)  # (H, W)
LSB = 2 / 255  # one uint8 step in [-1, 1]
RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def _pattern(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth gradients plus hard-edged blocks (so resampling differences would show)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                    ((x // 5 + y // 4 + seed) % 2) * 200 + seed * 5], axis=-1)  # fmt: skip
    return img.astype(np.uint8)


def _encode(pixels: np.ndarray, ext: str, **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, {"png": "PNG", "jpg": "JPEG"}[ext], **save)
    return out.getvalue()


def _write(root, samples, per_shard=4):
    """samples: (key, {ext: bytes}) -> shards + manifest in ``root``."""
    with ShardWriter(root, per_shard) as writer:
        for key, members in samples:
            writer.write(key, members)
    Manifest(writer.shards, fields={"txt": {}, "image": {}}).write(root / "manifest.json")
    return root


def _sample(i: int, ext: str, data: bytes, meta=None) -> tuple[str, dict[str, bytes]]:
    members = {"txt": f"prompt {i}".encode(), ext: data}
    if meta is not None:
        members["json"] = json.dumps(meta).encode()
    return f"{i:010d}", members


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """14 images in 4 shards: PNG and JPEG (three chroma subsamplings), landscape, portrait,
    smaller than the target (upscaled), palette / RGBA PNG, greyscale and EXIF-rotated JPEG."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    shapes = [(30, 40), (48, 24), (30, 40), (24, 48), (37, 53), (12, 10), (40, 30), (64, 64),
              (30, 40), (48, 24), (21, 33), (30, 40), (50, 20), (16, 20)]  # fmt: skip
    samples = []
    for i, (h, w) in enumerate(shapes):
        pixels = _pattern(h, w, i)
        if i == 8:
            data = _encode(pixels, "jpg", exif=exif.tobytes())
        elif i == 9:
            data = _encode(pixels[..., 1], "jpg", quality=90)  # greyscale
        elif i == 10:
            data = _encode(pixels, "png")
            data = _encode(np.asarray(Image.open(io.BytesIO(data)).convert("P")), "png")
        elif i == 11:
            rgba = np.dstack([pixels, np.full((h, w), 90, np.uint8)])
            out = io.BytesIO()
            Image.fromarray(rgba).save(out, "PNG")
            data = out.getvalue()
        elif i % 2:
            data = _encode(pixels, "jpg", quality=90, subsampling=(i // 2) % 3)
        else:
            data = _encode(pixels, "png")
        samples.append(_sample(i, "jpg" if i in (8, 9) or (i % 2 and i < 10) else "png",
                               data, meta={"i": i}))  # fmt: skip
    return _write(tmp_path_factory.mktemp("images"), samples)


def _epoch(loader) -> list[ImageBatch]:
    return list(loader)


def _pil(source, batch_size=4, **kw) -> PILImageBatchLoader:
    kw.setdefault("rank", 0)
    kw.setdefault("world_size", 1)
    return build_image_loader(source, batch_size, size=kw.pop("size", SIZE), backend="pil", **kw)


# ---------------------------------------------------------------------------------------------
# Pillow backend


def test_pil_batches_shapes_range_text_and_dtype(dataset):
    loader = _pil(dataset, batch_size=5, epochs=1, shuffle=False)
    batches = _epoch(loader)
    assert [len(b) for b in batches] == [5, 5, 4]
    first = batches[0]
    assert isinstance(first, ImageBatch) and isinstance(first, PromptBatch)
    assert first.images.shape == (5, 3, *SIZE) and first.images.dtype == torch.float32
    assert first.keys == [f"{i:010d}" for i in range(5)]
    assert first.prompts == [f"prompt {i}" for i in range(5)] and first.meta[3] == {"i": 3}
    images = torch.cat([b.images for b in batches])
    assert images.min() >= -1 and images.max() <= 1 and images.min() == -1 and images.max() == 1
    # Exactly x / 127.5 - 1 of uint8 values.
    assert torch.allclose((images + 1) * 127.5, ((images + 1) * 127.5).round(), atol=1e-4)
    # EXIF orientation applied: the 30x40 JPEG displays as 40x30.
    crops = [c for b in batches for c in b.crops]
    assert (crops[8].height, crops[8].width) == (40, 30)
    assert (crops[5].resized_height, crops[5].resized_width) == (24, 20)  # 12x10 upscaled x2

    bf16 = next(iter(_pil(dataset, batch_size=5, shuffle=False, dtype=torch.bfloat16)))
    assert bf16.images.dtype == torch.bfloat16
    assert torch.equal(bf16.images, first.images.bfloat16())
    moved = first.to("cpu", torch.float16)
    assert isinstance(moved, ImageBatch) and moved.images.dtype == torch.float16


def test_plan_rounding_and_center_offset():
    plan = plan_crop(30, 40, (16, 16))  # scale 16/30: width 21.33 -> 21, excess 5 -> left 3
    assert (plan.resized_height, plan.resized_width, plan.top, plan.left) == (16, 21, 0, 3)
    plan = plan_crop(2, 3, (1, 1))  # width 1.5 rounds up to 2; excess 1 -> offset 1
    assert (plan.resized_height, plan.resized_width, plan.left) == (1, 2, 1)
    plan = plan_crop(100, 7, (16, 16))
    assert (plan.resized_height, plan.resized_width, plan.top) == (229, 16, 107)
    plan = plan_crop(12, 10, (16, 20))  # upscale: width sets the scale
    assert (plan.resized_height, plan.resized_width, plan.top, plan.left) == (24, 20, 4, 0)


@pytest.mark.parametrize("crop", ["center", "random"])
def test_known_regions_land_where_expected(tmp_path, crop):
    # Landscape 24x48, left half red, right half blue -> 12x12: resized 12x24 (scale 1/2).
    land = np.zeros((24, 48, 3), np.uint8)
    land[:, :24], land[:, 24:] = RED, BLUE
    # Portrait 48x24, top half green, bottom half white -> resized 24x12.
    port = np.zeros((48, 24, 3), np.uint8)
    port[:24], port[24:] = GREEN, WHITE
    _write(tmp_path, [_sample(0, "png", _encode(land, "png")),
                      _sample(1, "png", _encode(port, "png"))])  # fmt: skip
    batch = next(_pil(tmp_path, batch_size=2, size=12, shuffle=False, crop=crop, seed=3))
    (land_crop, port_crop), plans = batch.images, batch.crops

    def color(rgb):
        return torch.tensor(rgb, dtype=torch.float32).view(3, 1) / 127.5 - 1

    # The red/blue edge sits at resized column 12, i.e. at crop column 12 - left; columns more
    # than one resized pixel (the filter's reach) away from it are pure.
    left = plans[0].left
    assert plans[0].resized_width == 24 and (left == 6 if crop == "center" else 0 <= left <= 12)
    for col in range(12):
        edge = 12 - left
        if col < edge - 1:
            assert torch.equal(land_crop[:, :, col], color(RED).expand(3, 12))
        elif col > edge:
            assert torch.equal(land_crop[:, :, col], color(BLUE).expand(3, 12))
    top = plans[1].top
    assert plans[1].resized_height == 24 and (top == 6 if crop == "center" else 0 <= top <= 12)
    for row in range(12):
        edge = 12 - top
        if row < edge - 1:
            assert torch.equal(port_crop[:, row, :], color(GREEN).expand(3, 12))
        elif row > edge:
            assert torch.equal(port_crop[:, row, :], color(WHITE).expand(3, 12))


def test_random_crop_is_a_window_of_the_resized_image_and_seeded(dataset):
    batches = _epoch(_pil(dataset, batch_size=7, epochs=1, shuffle=False, crop="random", seed=5))
    again = _epoch(_pil(dataset, batch_size=7, epochs=1, shuffle=False, crop="random", seed=5))
    other = _epoch(_pil(dataset, batch_size=7, epochs=1, shuffle=False, crop="random", seed=6))
    crops = [c for b in batches for c in b.crops]
    assert crops == [c for b in again for c in b.crops]
    assert crops != [c for b in other for c in b.crops]
    assert len({(c.top, c.left) for c in crops}) > 3
    # Each window is the planned slice of the full resized image.
    for i in (0, 4, 12):
        c = crops[i]
        full = plan_crop(c.height, c.width, (c.resized_height, c.resized_width))
        pixels = np.asarray(Image.open(io.BytesIO(_raw(dataset, i))).convert("RGB"))
        whole = resize_crop(pixels, full)
        want = whole[c.top : c.top + SIZE[0], c.left : c.left + SIZE[1]]
        got = ((batches[i // 7].images[i % 7] + 1) * 127.5).round().to(torch.uint8)
        assert torch.equal(got.permute(1, 2, 0), torch.from_numpy(np.array(want)))


def _raw(root, i: int) -> bytes:
    reader = PromptShardReader(root, shuffle=False, epochs=1)
    sample = list(reader)[i]
    import tarfile

    with tarfile.open(root / sample.shard) as tar:
        name = next(n for n in tar.getnames() if n.startswith(sample.key + ".") and
                    n.split(".", 1)[1] in ("png", "jpg"))  # fmt: skip
        return tar.extractfile(name).read()


def test_two_ranks_read_disjoint_samples_covering_the_epoch(dataset):
    keys = []
    for rank in range(2):
        loader = _pil(dataset, batch_size=3, rank=rank, world_size=2, epochs=1, seed=1)
        keys.append([k for b in loader for k in b.keys])
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == [f"{i:010d}" for i in range(14)]
    # The same order as the prompt reader over the same shards (image shards are prompt shards).
    prompts = PromptShardReader(dataset, rank=1, world_size=2, seed=1, epochs=1)
    assert keys[1] == [s.key for s in prompts]

    # Resume at another data-parallel size: both ranks' states merged, loaded by one rank.
    loaders = [_pil(dataset, batch_size=3, rank=r, world_size=2, epochs=1, seed=1) for r in (0, 1)]
    seen = [k for loader in loaders for k in next(loader).keys]
    merged = merge_state_dicts([loader.state_dict() for loader in loaders])
    single = _pil(dataset, batch_size=3, epochs=1, seed=1)
    single.load_state_dict(merged)
    rest = [k for b in single for k in b.keys]
    assert sorted(seen + rest) == [f"{i:010d}" for i in range(14)]


def test_seeded_order_is_deterministic(dataset):
    def run(seed):
        loader = _pil(dataset, batch_size=4, seed=seed)
        return [next(loader) for _ in range(5)]  # crosses into the second epoch

    a, b, c = run(7), run(7), run(8)
    assert [x.keys for x in a] == [x.keys for x in b]
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b))
    assert [x.keys for x in a] != [x.keys for x in c]


def test_resume_continues_exactly(dataset):
    reference = _pil(dataset, batch_size=3, seed=2, crop="random", prefetch=2)
    want = [next(reference) for _ in range(6)]
    first = _pil(dataset, batch_size=3, seed=2, crop="random", prefetch=2)
    for _ in range(2):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    first.close()
    resumed = _pil(dataset, batch_size=3, seed=2, crop="random", prefetch=0)
    resumed.load_state_dict(state)
    for expected in want[2:]:
        got = next(resumed)
        assert got.keys == expected.keys and torch.equal(got.images, expected.images)


def test_undecodable_and_missing_images_are_skipped_and_counted(tmp_path):
    good = _encode(_pattern(30, 40, 0), "png")
    samples = [_sample(i, "png", good) for i in range(6)]
    samples[2] = _sample(2, "png", b"\x89PNG not really")
    samples[4] = (samples[4][0], {"txt": b"no image here"})
    _write(tmp_path, samples, per_shard=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = _pil(tmp_path, batch_size=2, shuffle=False, epochs=1)
        keys = [k for b in loader for k in b.keys]
    assert keys == [f"{i:010d}" for i in (0, 1, 3, 5)]
    assert loader.counters["bad_samples"] == 2 and loader.counters["skipped"] == 2
    messages = [str(w.message) for w in caught if issubclass(w.category, ShardReadWarning)]
    assert any("0000000002" in m and ".png: cannot decode" in m for m in messages)
    assert any("0000000004" in m and "no image member" in m for m in messages)


# ---------------------------------------------------------------------------------------------
# builder and factory


def test_builder_directory_list_and_cli(tmp_path, capsys):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(_pattern(30, 40, 1)).save(src / "a.jpg", quality=92)
    (src / "a.txt").write_text("a photo\n")
    Image.fromarray(_pattern(24, 48, 2)).save(src / "sub" / "b.bmp")  # converted to PNG
    (src / "sub" / "b.txt").write_text("a bitmap")
    Image.fromarray(_pattern(10, 10, 3)).save(src / "c.png")  # no caption: dropped
    (src / "d.png").write_bytes(b"garbage")
    (src / "d.txt").write_text("broken file")
    rows = [{"path": "photos/a.jpg", "text": "listed", "score": 5},
            {"path": "photos/missing.png", "text": "no file"}, {"text": "no path"}]  # fmt: skip
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    summary = build_image_shards([src], tmp_path / "dir_shards", samples_per_shard=1)
    assert summary.samples == 2 and summary.formats == {"jpg": 1, "png": 1}
    s = summary.stats
    assert (s.records, s.no_caption, s.bad_image, s.converted) == (4, 1, 1, 1)
    batch = next(_pil(tmp_path / "dir_shards", batch_size=2, shuffle=False, size=8))
    assert batch.prompts == ["a photo", "a bitmap"]
    assert batch.meta == [{"file": "a.jpg"}, {"file": "sub/b.bmp"}]
    assert (batch.crops[1].height, batch.crops[1].width) == (24, 48)
    assert (src / "a.jpg").read_bytes() == _member(tmp_path / "dir_shards", "0000000000", "jpg")

    out = tmp_path / "list_shards"
    assert build_main([str(tmp_path / "list.jsonl"), "--out", str(out), "--image-field", "path",
                       "--field", "text", "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "wrote 1 samples (1 jpg)" in printed and "2 without an image file" in printed
    sample = next(iter(PromptShardReader(out, epochs=1)))  # image shards are prompt shards
    assert sample.prompt == "listed" and sample.meta == {"score": 5}
    with pytest.raises(SystemExit) as exit_:
        build_main([str(tmp_path / "list.jsonl"), "--out", str(out)])
    assert exit_.value.code == 2 and "is not empty" in capsys.readouterr().err

    import webdataset as wds

    urls = sorted(str(p) for p in (tmp_path / "dir_shards").glob("*.tar"))
    read = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8"))
    assert [r["txt"] for r in read] == ["a photo", "a bitmap"]
    assert read[1]["png"].shape == (24, 48, 3)


def _member(root, key: str, ext: str) -> bytes:
    import tarfile

    for path in sorted(root.glob("*.tar")):
        with tarfile.open(path) as tar:
            if f"{key}.{ext}" in tar.getnames():
                return tar.extractfile(f"{key}.{ext}").read()
    raise KeyError(key)


def test_factory_backends_and_errors(dataset, monkeypatch):
    import sys

    import mfmegatron.data.images.dali as dali_module

    monkeypatch.setattr(dali_module, "dali_available", lambda: False)
    loader = build_image_loader(dataset, 2, size=8, backend="auto")
    assert isinstance(loader, PILImageBatchLoader) and loader.backend == "pil"
    # Without torch.distributed or megatron groups: data-parallel rank 0 of 1.
    assert (loader.reader.rank, loader.reader.world_size) == (0, 1)
    with pytest.raises(ValueError, match="backend must be one of"):
        build_image_loader(dataset, 2, size=8, backend="torchvision")
    with pytest.raises(ValueError, match="'num_threads' is a DALI option"):
        build_image_loader(dataset, 2, size=8, backend="pil", num_threads=2)
    with pytest.raises(ValueError, match="crop must be one of"):
        build_image_loader(dataset, 2, size=8, backend="pil", crop="corner")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if DALI were not installed
    with pytest.raises(ImportError, match=r"pip install 'mfmegatron\[gpu\]'"):
        build_image_loader(dataset, 2, size=8, backend="dali")


# ---------------------------------------------------------------------------------------------
# DALI backend (skipped without nvidia.dali)


@pytest.fixture()
def dali():
    return pytest.importorskip("nvidia.dali")


def _dali(source, batch_size=4, **kw):
    kw.setdefault("rank", 0)
    kw.setdefault("world_size", 1)
    return build_image_loader(source, batch_size, size=kw.pop("size", SIZE), backend="dali",
                              device_id=None, num_threads=2, **kw)  # fmt: skip


def _assert_close(a: ImageBatch, b: ImageBatch, atol=LSB + 1e-6):
    assert a.keys == b.keys and a.prompts == b.prompts and a.crops == b.crops
    assert a.images.shape == b.images.shape and a.images.dtype == b.images.dtype
    diff = (a.images.float() - b.images.float()).abs().max().item()
    assert diff <= atol, f"max |DALI - Pillow| = {diff:.5f} (= {diff / LSB:.2f}/255) > {atol:.5f}"


@pytest.mark.parametrize("crop", ["center", "random"])
def test_dali_cpu_matches_pil(dataset, dali, crop):
    for rank in range(2):
        options = dict(batch_size=4, rank=rank, world_size=2, seed=4, crop=crop, epochs=1)
        theirs = _epoch(_dali(dataset, **options))
        ours = _epoch(_pil(dataset, **options))
        assert [len(b) for b in theirs] == [4, 3]  # a short last batch too
        for a, b in zip(theirs, ours):
            assert a.images.device.type == "cpu"
            _assert_close(a, b)


@pytest.mark.parametrize("filter", ["bicubic", "lanczos"])
def test_dali_other_filters_agree_on_average(dataset, dali, filter):
    theirs = next(_dali(dataset, batch_size=14, filter=filter, shuffle=False))
    ours = next(_pil(dataset, batch_size=14, filter=filter, shuffle=False))
    diff = (theirs.images - ours.images).abs() / LSB  # in uint8 steps
    assert theirs.keys == ours.keys and diff.mean() < 0.5 and diff.max() <= 40


def test_dali_bf16_output(dataset, dali):
    theirs = next(_dali(dataset, batch_size=6, dtype=torch.bfloat16, shuffle=False))
    ours = next(_pil(dataset, batch_size=6, dtype=torch.bfloat16, shuffle=False))
    _assert_close(theirs, ours, atol=LSB + 2**-7)  # plus one bfloat16 step near 1


def test_dali_resume_and_states_shared_with_pil(dataset, dali):
    pil = _pil(dataset, batch_size=3, seed=9, crop="random")
    want = [next(pil) for _ in range(7)]
    # DALI prefetches ahead of what it returned; its state is still the returned position.
    loader = _dali(dataset, batch_size=3, seed=9, crop="random", prefetch=3)
    for expected in want[:3]:
        _assert_close(next(loader), expected)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["processed"] == 9 and loader.counters["delivered"] == 9
    resumed = _dali(dataset, batch_size=3, seed=9, crop="random")
    resumed.load_state_dict(state)
    _assert_close(next(resumed), want[3])
    # A Pillow-backend state loads into the DALI loader and the other way round.
    resumed.load_state_dict(pil.state_dict())
    back = _pil(dataset, batch_size=3, seed=9, crop="random")
    back.load_state_dict(loader.state_dict())
    _assert_close(next(back), want[3])


def test_dali_skips_samples_without_a_readable_image(tmp_path, dali):
    good = _encode(_pattern(30, 40, 0), "jpg")
    samples = [_sample(i, "jpg", good) for i in range(5)]
    samples[1] = _sample(1, "jpg", b"\xff\xd8 not a jpeg")
    _write(tmp_path, samples)
    with pytest.warns(ShardReadWarning, match="0000000001"):
        loader = _dali(tmp_path, batch_size=2, shuffle=False, epochs=1)
        keys = [k for b in loader for k in b.keys]
    assert keys == [f"{i:010d}" for i in (0, 2, 3, 4)] and loader.counters["bad_samples"] == 1


def test_dali_native_reader_shards_matches_pil_and_resumes_from_checkpoint(dataset, dali):
    # Ranks read disjoint contiguous parts of the sample list; pixels equal Pillow's for the
    # same key (center crop: DALI's own not_smaller resize and crop_pos=0.5 follow our plan).
    by_key = {k: img for b in _epoch(_pil(dataset, batch_size=14, shuffle=False, epochs=1))
              for k, img in zip(b.keys, b.images)}  # fmt: skip
    seen = []
    for rank in range(2):
        loader = _dali(dataset, batch_size=7, rank=rank, world_size=2, shuffle=False,
                       reader="dali")  # fmt: skip
        batch = next(loader)
        assert batch.crops == [None] * 7 and batch.positions == [-1] * 7
        for key, prompt, image in zip(batch.keys, batch.prompts, batch.images):
            assert prompt == f"prompt {int(key)}"
            assert (image - by_key[key]).abs().max() <= LSB + 1e-6, key
        seen += batch.keys
    assert sorted(seen) == sorted(by_key)

    # Resumption: DALI's checkpoint continues the shuffle buffer and the random crops exactly.
    options = dict(batch_size=3, seed=11, crop="random", reader="dali", initial_fill=8)
    loader = _dali(dataset, **options)
    for _ in range(2):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    want = [next(loader) for _ in range(3)]
    resumed = _dali(dataset, **options)
    resumed.load_state_dict(state)
    for expected in want:
        got = next(resumed)
        assert got.keys == expected.keys and torch.equal(got.images, expected.images)
    with pytest.raises(ValueError, match="only valid for the same settings"):
        _dali(dataset, **{**options, "seed": 12}).load_state_dict(state)
    with pytest.raises(ValueError, match="resumes only from its own state"):
        _dali(dataset, **options).load_state_dict(_pil(dataset).state_dict())
    with pytest.raises(ValueError, match="epochs"):
        _dali(dataset, reader="dali", epochs=1)
