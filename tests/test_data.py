"""The input pipeline: patch alignment, transforms, determinism, resumption, sharding, sources, bad input."""
import contextlib
import logging
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
# Imported eagerly: tfds.testing imports lazily, and a first import inside a test can hit CPython 3.11's
# "AST constructor recursion depth mismatch" while earlier tests' grain threads are still running.
from tensorflow_datasets.testing import mock_data

from rnan_jax import data, degrade, ensemble, images, sources, tfds_source
from rnan_jax.images import write_image


def coordinate_image(h: int, w: int, tag: int) -> np.ndarray:
    """uint8 [h, w, 3] whose pixel (r, c) is (r, c, tag): every crop says where it came from."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([r, c, np.full_like(r, tag)], axis=-1).astype(np.uint8)


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A random but locally smooth uint8 RGB image (noise box-blurred 5x5), unique at every position."""
    noise = np.random.default_rng(seed).uniform(0, 255, (h + 4, w + 4, 3))
    blurred = sum(noise[i: i + h, j: j + w] for i in range(5) for j in range(5)) / 25
    return np.clip(np.rint(blurred * 1.7 - 90), 0, 255).astype(np.uint8)


def config(scale: int, **overrides) -> data.DataConfig:
    return data.DataConfig.from_config({"val_source": "demo", **overrides}, scale=scale)


def take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def match_patch(lr_patch, hr_patch, full_lr, full_hr, scale):
    """The (y, x, k) for which lr_patch = transform(full_lr crop at (y, x), k) and hr_patch is the HR crop
    at (scale*y, scale*x) under the same k; asserts there is exactly one. Needs coordinate-coded images."""
    p = lr_patch.shape[0]
    found = []
    for k in range(8):
        lr0, hr0 = ensemble.inverse_transform(lr_patch, k), ensemble.inverse_transform(hr_patch, k)
        y, x = int(lr0[0, 0, 0]) // scale, int(lr0[0, 0, 1]) // scale
        if (np.array_equal(lr0, full_lr[y: y + p, x: x + p])
                and np.array_equal(hr0, full_hr[scale * y: scale * (y + p), scale * x: scale * (x + p)])):
            found.append((y, x, k))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def div2k_folder(tmp_path):
    """HR/0001.png.. and LR/X2/0001x2.png.. in DIV2K's naming; LR pixel (i, j) = HR pixel (2i, 2j)."""
    shapes = [(64, 80), (81, 65), (70, 96)]  # odd sizes: HR is cropped to 2 * LR
    full = {}
    for i, (h, w) in enumerate(shapes, start=1):
        hr = coordinate_image(h, w, tag=40 * i)
        lr = hr[: h // 2 * 2: 2, : w // 2 * 2: 2]
        write_image(tmp_path / "HR" / f"{i:04d}.png", hr)
        write_image(tmp_path / "LR" / "X2" / f"{i:04d}x2.png", lr)
        full[40 * i] = (hr[: 2 * lr.shape[0], : 2 * lr.shape[1]], lr)
    return tmp_path, full


def test_config_defaults_and_errors():
    cfg = data.DataConfig.from_config(data.default_config(), scale=4)
    assert (cfg.source, cfg.patch_size, cfg.tfds_name, cfg.augment) == ("tfds", 48, "div2k/bicubic_x4", True)
    assert cfg.tfds_data_dir is None and cfg.cache_dir
    cfg = data.DataConfig.from_config({"source": "folder", "hr_dirs": " a, b ,", "lr_dirs": "c,d"}, scale=2)
    assert cfg.hr_dirs == ("a", "b") and cfg.lr_dirs == ("c", "d")
    with pytest.raises(ValueError, match="data.source must be one of tfds, folder, demo; got 'div2k'"):
        data.DataConfig.from_config({"source": "div2k"}, scale=2)
    with pytest.raises(ValueError, match=r"unknown data config keys \['patchsize'\]"):
        data.DataConfig.from_config({"patchsize": 32}, scale=2)
    with pytest.raises(ValueError, match="needs data.hr_dirs"):
        data.DataConfig.from_config({"source": "folder"}, scale=2)
    with pytest.raises(ValueError, match="names 1 folders for 2"):
        data.DataConfig.from_config({"source": "folder", "hr_dirs": "a,b", "lr_dirs": "c"}, scale=2)


def test_transforms_are_the_8_distinct_dihedral_maps_and_invert():
    image = coordinate_image(5, 7, 0)
    outs = [ensemble.transform(image, k) for k in range(8)]
    assert len({o.tobytes() + bytes(o.shape) for o in outs}) == 8
    for k, o in enumerate(outs):
        np.testing.assert_array_equal(ensemble.inverse_transform(o, k), image)
    np.testing.assert_array_equal(outs[1], np.rot90(image))
    np.testing.assert_array_equal(outs[4], image[:, ::-1])


def test_random_patch_aligns_lr_file_patches_and_applies_one_transform_to_both(div2k_folder, tmp_path):
    root, full = div2k_folder
    cfg = config(2, source="folder", hr_dirs=str(root / "HR"), lr_dirs=str(root / "LR"), patch_size=8,
                 cache_dir=str(tmp_path / "cache"))
    it = data.train_iterator(cfg, global_batch_size=16, seed=3, process_index=0, process_count=1)
    used_k, used_tags = set(), set()
    for batch in take(it, 6):
        assert batch["lr"].shape == (16, 8, 8, 3) and batch["hr"].shape == (16, 16, 16, 3)
        assert batch["lr"].dtype == batch["hr"].dtype == np.uint8
        for lr, hr in zip(batch["lr"], batch["hr"]):
            tag = int(lr[0, 0, 2])
            _, _, k = match_patch(lr, hr, full[tag][1], full[tag][0], 2)
            used_k.add(k)
            used_tags.add(tag)
    assert used_k == set(range(8)) and used_tags == {40, 80, 120}

    cfg = config(2, source="folder", hr_dirs=str(root / "HR"), lr_dirs=str(root / "LR"), patch_size=8,
                 cache_dir=str(tmp_path / "cache"), augment=False)
    batch = next(data.train_iterator(cfg, global_batch_size=16, seed=3, process_index=0, process_count=1))
    for lr, hr in zip(batch["lr"], batch["hr"]):
        tag = int(lr[0, 0, 2])
        assert match_patch(lr, hr, full[tag][1], full[tag][0], 2)[2] == 0


def test_bicubic_made_lr_is_cached_once_and_aligned_with_the_hr_crop(tmp_path, monkeypatch):
    hr_full = [smooth_image(97, 122, seed) for seed in range(2)]  # not multiples of 4: modcrop applies
    for i, hr in enumerate(hr_full):
        write_image(tmp_path / "HR" / f"img{i}.png", hr)
    calls = []
    real = degrade.bicubic_lr
    monkeypatch.setattr(degrade, "bicubic_lr", lambda hr, s: calls.append(hr.shape) or real(hr, s))
    cfg = config(4, source="folder", hr_dirs=str(tmp_path / "HR"), patch_size=12, augment=False,
                 cache_dir=str(tmp_path / "cache"))
    pairs = data.training_pairs(cfg)
    assert len(calls) == 2
    data.training_pairs(cfg)  # a second run reads the cache
    batches = take(data.train_iterator(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1), 3)
    assert len(calls) == 2

    full = [(degrade.modcrop(hr, 4), degrade.bicubic_lr(hr, 4)) for hr in hr_full]
    for i, name in enumerate(pairs.names):
        np.testing.assert_array_equal(pairs[i]["lr"], full[int(name[-5])][1])
    for batch in batches:
        for lr, hr in zip(batch["lr"], batch["hr"]):
            hits = [(j, y, x) for j, (fhr, flr) in enumerate(full)
                    for y in range(flr.shape[0] - 11) for x in range(flr.shape[1] - 11)
                    if np.array_equal(flr[y: y + 12, x: x + 12], lr)]
            assert len(hits) == 1
            j, y, x = hits[0]
            np.testing.assert_array_equal(hr, full[j][0][4 * y: 4 * y + 48, 4 * x: 4 * x + 48])
            # LR pixel j of a patch depends on HR rows 4j-6..4j+9 only: away from the border the patch's own
            # bicubic LR is the LR patch.
            np.testing.assert_array_equal(degrade.imresize(hr, 0.25)[2:-2, 2:-2], lr[2:-2, 2:-2])


def test_same_seed_same_batches_other_seed_other_batches(div2k_folder, tmp_path):
    root, _ = div2k_folder
    cfg = config(2, source="folder", hr_dirs=str(root / "HR"), lr_dirs=str(root / "LR"), patch_size=8,
                 cache_dir=str(tmp_path / "cache"))
    def make(seed):
        return data.train_iterator(cfg, global_batch_size=4, seed=seed, process_index=0, process_count=1)

    a, b, c = take(make(7), 5), take(make(7), 5), take(make(8), 5)
    assert_batches_equal(a, b)
    assert not all(np.array_equal(x["hr"], y["hr"]) for x, y in zip(a, c))


@pytest.mark.parametrize("workers,resume_workers", [(0, 0), (0, 2), (2, 0)])
def test_restored_iterator_state_gives_the_same_following_batches(div2k_folder, tmp_path, workers, resume_workers):
    root, _ = div2k_folder
    def make(n):
        return data.train_iterator(
            config(2, source="folder", hr_dirs=str(root / "HR"), lr_dirs=str(root / "LR"), patch_size=8,
                   cache_dir=str(tmp_path / "cache"), num_workers=n),
            global_batch_size=4, seed=1, process_index=0, process_count=1)

    it = make(workers)
    take(it, 5)  # past the 3 images: the epoch boundary and a reshuffle are inside the span
    state = it.get_state()
    assert state == {"next_batch": 5}
    expected = take(it, 6)
    resumed = make(resume_workers)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 6), expected)
    assert resumed.get_state() == {"next_batch": 11}
    resumed.close()  # stops worker processes and frees their shared memory
    with pytest.raises(ValueError, match="closed iterator"):
        next(resumed)


def test_iterator_state_round_trips_through_an_orbax_checkpoint(div2k_folder, tmp_path):
    root, _ = div2k_folder
    cfg = config(2, source="folder", hr_dirs=str(root / "HR"), lr_dirs=str(root / "LR"), patch_size=8,
                 cache_dir=str(tmp_path / "cache"))
    def make():
        return data.train_iterator(cfg, global_batch_size=4, seed=5, process_index=0, process_count=1)

    it = make()
    take(it, 4)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    state = {"step": np.array(4), "w": np.arange(3.0)}
    manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = take(it, 4)
    resumed = make()
    restored = manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore(state),
                                                          data=grain.checkpoint.CheckpointRestore(resumed)))
    np.testing.assert_array_equal(restored["state"]["w"], state["w"])
    assert_batches_equal(take(resumed, 4), expected)
    manager.close()


def test_global_batches_do_not_depend_on_the_process_count(tmp_path):
    """Global batch k is one sequence of patches whatever the number of processes: process i of n yields
    the i-th n-th of it, and an iterator set to batch k (a resume at step k) continues it."""
    for i in range(7):  # constant images: a patch's value says which image it came from
        write_image(tmp_path / "HR" / f"{i}.png", np.full((40, 48, 3), 30 * (i + 1), np.uint8))
    cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), patch_size=8, cache_dir=str(tmp_path / "c"))
    one = take(data.train_iterator(cfg, global_batch_size=8, seed=0, process_index=0, process_count=1), 6)
    assert {int(v) // 30 - 1 for b in one for v in b["hr"][:, 0, 0, 0]} == set(range(7))
    for n in (2, 4):
        parts = [take(data.train_iterator(cfg, global_batch_size=8, seed=0, process_index=i, process_count=n), 6)
                 for i in range(n)]
        assert parts[0][0]["lr"].shape == (8 // n, 8, 8, 3) and parts[0][0]["hr"].shape == (8 // n, 16, 16, 3)
        for k in range(6):
            assert_batches_equal([{key: np.concatenate([p[k][key] for p in parts]) for key in ("lr", "hr")}], [one[k]])
    resumed = data.train_iterator(cfg, global_batch_size=8, seed=0, process_index=1, process_count=2)
    resumed.set_state({"next_batch": 4})  # checkpointed by one process at step 4, resumed by two
    assert_batches_equal([next(resumed)], [{key: one[4][key][4:] for key in ("lr", "hr")}])
    with pytest.raises(ValueError, match="global batch size 9 is not divisible by the 2 processes"):
        data.train_iterator(cfg, global_batch_size=9, seed=0, process_index=0, process_count=2)


def _div2k_examples(split, scale=4):
    """DIV2K-shaped examples: LR [h, w] coordinate-coded, HR = LR upsampled by pixel repetition."""
    count = {"train": 3, "validation": 2}[str(split)]
    out = []
    for i in range(count):
        hr = coordinate_image(64 + 8 * i, 96, tag=50 * (i + 1) + (100 if str(split) == "validation" else 0))
        out.append({"hr": hr, "lr": hr[::scale, ::scale].copy()})
    return out


def test_tfds_source_reads_a_div2k_shaped_dataset(tmp_path):
    cfg = config(4, source="tfds", tfds_data_dir=str(tmp_path / "tfds"), patch_size=6,
                 cache_dir=str(tmp_path / "cache"), val_source="tfds", val_max_images=0)
    with mock_data(as_data_source_fn=lambda builder, split, **kw: _div2k_examples(split)):
        full = {int(e["hr"][0, 0, 2]): e for e in _div2k_examples("train")}
        pairs = data.training_pairs(cfg)
        assert pairs.names == ("div2k/bicubic_x4:train[0]", "div2k/bicubic_x4:train[1]", "div2k/bicubic_x4:train[2]")
        batch = next(data.train_iterator(cfg, global_batch_size=8, seed=0, process_index=0, process_count=1))
        assert batch["lr"].shape == (8, 6, 6, 3) and batch["hr"].shape == (8, 24, 24, 3)
        for lr, hr in zip(batch["lr"], batch["hr"]):
            e = full[int(lr[0, 0, 2])]
            match_patch(lr, hr, e["lr"], e["hr"], 4)
        val = data.validation_images(cfg)
    assert [(p.name, p.lr.shape, p.hr.shape) for p in val] == [
        ("div2k/bicubic_x4:validation[0]", (16, 24, 3), (64, 96, 3)),
        ("div2k/bicubic_x4:validation[1]", (18, 24, 3), (72, 96, 3)),
    ]


def test_tfds_cache_keys_of_a_gs_data_dir_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    """tfds_data_dir=gs://BUCKET/... (the README's TPU command): the keys held the cwd ("/home/u/gs:/BUCKET/..."),
    so a run started from another folder decoded DIV2K (7 GB) into the cache again."""
    def keys(data_dir, cwd):
        monkeypatch.chdir(cwd)
        with mock_data(as_data_source_fn=lambda builder, split, **kw: _div2k_examples(split)):
            return [spec.key for spec in tfds_source.tfds_specs("div2k/bicubic_x4", "train", data_dir)]

    (tmp_path / "a").mkdir()
    assert keys("gs://bucket/tfds", tmp_path) == keys("gs://bucket/tfds", tmp_path / "a")
    assert keys("tfds", tmp_path) != keys("tfds", tmp_path / "a")  # relative local folders: two folders
    assert keys(str(tmp_path / "tfds"), tmp_path) == keys("tfds", tmp_path)



def test_tfds_datasets_of_the_same_name_in_two_default_data_folders_do_not_share_cache_entries(tmp_path, monkeypatch):
    """Without data.tfds_data_dir, TFDS reads $TFDS_DATA_DIR (else ~/tensorflow_datasets), which the cache keys
    left out: a run with another $TFDS_DATA_DIR holding a dataset of the same name and size trained on the first
    one's images. The folder is in the key, the same as data.tfds_data_dir naming it."""
    def examples(builder, split, **kw):  # each folder's own images: the HR tag says which
        tag = {"a": 0, "b": 100}[os.path.basename(os.environ["TFDS_DATA_DIR"])]
        return [{"hr": coordinate_image(32, 32, tag + i), "lr": coordinate_image(8, 8, tag + i)} for i in range(2)]

    def tags(**overrides):
        cfg = config(4, source="tfds", patch_size=4, cache_dir=str(tmp_path / "cache"), **overrides)
        with mock_data(as_data_source_fn=examples):
            pairs = data.training_pairs(cfg)
        return [int(np.asarray(pairs[i]["hr"])[0, 0, 2]) for i in range(len(pairs))]

    for folder, expected in (("a", [0, 1]), ("b", [100, 101]), ("a", [0, 1])):
        monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / folder))
        assert tags() == expected, folder
    assert len(list((tmp_path / "cache").glob("*.hr.npy"))) == 4
    assert tags(tfds_data_dir=str(tmp_path / "b")) == [100, 101]  # the same folder named: its entries reused
    assert len(list((tmp_path / "cache").glob("*.hr.npy"))) == 4

def test_tfds_source_errors_in_one_line(tmp_path, caplog):
    cfg = config(4, source="tfds", tfds_data_dir=str(tmp_path / "none"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(sources.DataError, match="cannot read TFDS dataset 'div2k/bicubic_x4'") as e:
        data.training_pairs(cfg)
    assert "\n" not in str(e.value)
    assert f"(not prepared there: no {tmp_path}/none/div2k/bicubic_x4/<version>/dataset_info.json)" in str(e.value)
    assert not [r for r in caplog.records if "dataset_info.json" in r.getMessage()]  # said once, in the error
    empty = config(4, source="tfds", tfds_data_dir=str(tmp_path / "none"), tfds_split="train[800:]",
                   cache_dir=str(tmp_path / "cache"))
    with mock_data(as_data_source_fn=lambda builder, split, **kw: []):  # TFDS's slice of an 800-example split
        with pytest.raises(sources.DataError) as e:
            data.train_iterator(empty, global_batch_size=2, seed=0, process_index=0, process_count=1)
    assert str(e.value) == "training images (tfds div2k/bicubic_x4 split 'train[800:]'): the source holds no image"
    with mock_data(num_examples=3):  # random HR/LR shapes that do not match: all skipped
        with pytest.raises(sources.DataError, match="no usable image: all 3 were skipped") as e:
            data.training_pairs(cfg)
    assert "\n" not in str(e.value)


def test_a_tfds_name_with_a_version_is_looked_for_in_that_version_s_folder(tmp_path):
    """data.tfds_name="div2k/bicubic_x4:2.0.0": the error looked for ".../div2k/bicubic_x4:2.0.0/<version>/..." and
    said "not prepared" also when 2.0.0 was there and TFDS failed for another reason (here a damaged info)."""
    info = tmp_path / "tfds" / "div2k" / "bicubic_x4" / "2.0.0" / "dataset_info.json"
    info.parent.mkdir(parents=True)
    info.write_text("{}")
    assert tfds_source._tfds_unprepared("div2k/bicubic_x4:2.0.0", str(tmp_path / "tfds")) is None
    assert tfds_source._tfds_unprepared("div2k/bicubic_x4:2.*.*", str(tmp_path / "tfds")) is None
    assert tfds_source._tfds_unprepared("div2k/bicubic_x4:1.0.0", str(tmp_path / "tfds")) == (
        f"not prepared there: no {tmp_path}/tfds/div2k/bicubic_x4/1.0.0/dataset_info.json")
    with pytest.raises(sources.DataError) as e:
        tfds_source.open_tfds("div2k/bicubic_x4:2.0.0", "train", str(tmp_path / "tfds"))
    assert "not prepared there" not in str(e.value) and "\n" not in str(e.value)


def test_bad_files_are_reported_by_name_and_skipped(tmp_path, caplog):
    hr_dir = tmp_path / "HR"
    good = smooth_image(40, 44, 0)
    write_image(hr_dir / "good.png", good)
    write_image(hr_dir / "gray.png", good[..., 0])
    write_image(hr_dir / "rgba.png", good, alpha=np.full(good.shape[:2], 7, np.uint8))
    from PIL import Image
    Image.fromarray(good[..., 1].astype(np.uint16) * 257).save(hr_dir / "deep.png")  # 16-bit gray
    write_image(hr_dir / "small.png", good[:30])
    (hr_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (hr_dir / "truncated.png").write_bytes((hr_dir / "good.png").read_bytes()[:200])
    cfg = config(2, source="folder", hr_dirs=str(hr_dir), patch_size=16, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        pairs = data.training_pairs(cfg)
    names = sorted(os.path.basename(n) for n in pairs.names)
    assert names == ["deep.png", "good.png", "gray.png", "rgba.png"]
    for bad in ("small.png", "corrupt.png", "truncated.png"):
        assert any(bad in r.getMessage() for r in caplog.records), bad
    assert "skipped 3 of 7 images (2 unreadable or without a matching LR image, 1 smaller than the 32-pixel HR patch)" \
        in caplog.text
    by_name = {os.path.basename(n): pairs[i]["hr"] for i, n in enumerate(pairs.names)}
    np.testing.assert_array_equal(by_name["good.png"], good)
    np.testing.assert_array_equal(by_name["rgba.png"], good)
    np.testing.assert_array_equal(by_name["gray.png"], np.repeat(good[..., :1], 3, axis=-1))
    np.testing.assert_array_equal(by_name["deep.png"], np.repeat(good[..., 1:2], 3, axis=-1))

    for bad in ("good.png", "gray.png", "rgba.png", "deep.png"):
        os.remove(hr_dir / bad)
    with pytest.raises(sources.DataError, match=r"no usable image: all 3 were skipped .*; first: .*corrupt.png") as e:
        data.training_pairs(cfg)
    assert "\n" not in str(e.value)


def test_missing_or_empty_folders_and_missing_lr_files(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    for folder, message in [("missing", "no such folder"), ("empty", "holds no image files")]:
        cfg = config(2, source="folder", hr_dirs=str(tmp_path / folder), cache_dir=str(tmp_path / "c"))
        with pytest.raises(sources.DataError, match=message):
            data.training_pairs(cfg)
    for i in range(2):
        write_image(tmp_path / "HR" / f"{i:04d}.png", smooth_image(40, 40, i))
    write_image(tmp_path / "LR" / "X2" / "0000x2.png", smooth_image(20, 20, 0))
    cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), lr_dirs=str(tmp_path / "LR"), patch_size=8,
                 cache_dir=str(tmp_path / "c"))
    with caplog.at_level(logging.WARNING):
        assert len(data.training_pairs(cfg)) == 1
    assert "0001.png: no LR image in" in caplog.text


def test_a_missing_lr_file_is_reported_in_the_lr_folder_of_this_run(tmp_path, caplog):
    """The reason a missing LR file is skipped is kept in the cache; a rerun with another data.lr_dirs (in which
    the file is missing too) said "no LR image in <the first run's folder>"."""
    write_image(tmp_path / "HR" / "0001.png", smooth_image(40, 40, 0))
    write_image(tmp_path / "HR" / "0002.png", smooth_image(40, 40, 1))
    for lr in ("A", "B"):
        write_image(tmp_path / lr / "X2" / "0002x2.png", smooth_image(20, 20, 1))
    for lr in ("A", "B", "A"):
        cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), lr_dirs=str(tmp_path / lr), patch_size=8,
                     cache_dir=str(tmp_path / "c"))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert len(data.training_pairs(cfg)) == 1
        assert f"0001.png: no LR image in {tmp_path / lr} (looked for" in caplog.text, lr
        assert f"no LR image in {tmp_path / ('B' if lr == 'A' else 'A')} " not in caplog.text, lr


def test_a_broken_link_among_the_images_is_skipped_by_name(tmp_path, caplog):
    """A dangling symlink (a dataset of links whose target moved), as HR or as LR file, is one unusable image
    like an unreadable file: the run stopped at start-up with "[Errno 2] No such file or directory"."""
    for i in range(2):
        write_image(tmp_path / "HR" / f"{i:04d}.png", smooth_image(40, 40, i))
        write_image(tmp_path / "LR" / "X2" / f"{i:04d}x2.png", smooth_image(20, 20, i))
    os.symlink(tmp_path / "moved.png", tmp_path / "HR" / "0002.png")
    os.remove(tmp_path / "LR" / "X2" / "0001x2.png")
    os.symlink(tmp_path / "moved.png", tmp_path / "LR" / "X2" / "0001x2.png")
    for lr_dirs, usable, broken in (("", ["0000.png", "0001.png"], tmp_path / "HR" / "0002.png"),
                                    (str(tmp_path / "LR"), ["0000.png"], tmp_path / "LR" / "X2" / "0001x2.png")):
        cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), lr_dirs=lr_dirs, patch_size=8,
                     cache_dir=str(tmp_path / "c"))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            pairs = data.training_pairs(cfg)
        assert sorted(os.path.basename(n) for n in pairs.names) == usable
        assert f"skipping {broken}: No such file or directory" in caplog.text


def test_demo_sources(tmp_path):
    cfg = config(2, source="demo", patch_size=48)
    pairs = data.training_pairs(cfg)
    assert pairs.names == ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
    astronaut = pairs[0]
    assert astronaut["hr"].shape == (512, 512, 3) and astronaut["lr"].shape == (256, 256, 3)
    [pair] = data.validation_images(config(3))
    assert pair.name == "stereo_motorcycle_320x240" and pair.hr.shape == (240, 318, 3)
    assert pair.lr.shape == (80, 106, 3)
    np.testing.assert_array_equal(pair.lr, degrade.bicubic_lr(pair.hr, 3))


def test_benchmark_validation_images(data_dir):
    cfg = config(4, val_source="benchmark", val_set="Set5", val_dir=os.path.join(data_dir, "benchmark"),
                 val_max_images=3)
    val = data.validation_images(cfg)
    assert [p.name for p in val] == ["baby", "bird", "butterfly"]
    assert val[1].hr.shape == (288, 288, 3) and val[1].lr.shape == (72, 72, 3)
    np.testing.assert_array_equal(val[1].lr, degrade.bicubic_lr(val[1].hr, 4))


def test_cache_headers_are_read_without_numpy_s_thread_unsafe_parser(tmp_path, monkeypatch):
    """np.load's header parse (ast.literal_eval) fails at random in threads on CPython 3.11 ("AST constructor
    recursion depth mismatch"): the cache's pool of threads opened every entry with it."""
    import ast

    np.save(tmp_path / "a.npy", smooth_image(5, 7, 0))
    np.save(tmp_path / "f.npy", np.zeros((5, 7, 3), np.float32))
    (tmp_path / "t.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-1])

    def fail(*args, **kwargs):
        raise SystemError("AST constructor recursion depth mismatch (before=33, after=29)")

    monkeypatch.setattr(ast, "literal_eval", fail)
    stored = sources.StoredImage.open(str(tmp_path / "a.npy"))
    assert stored.shape == (5, 7, 3) and stored.offset == 128
    np.testing.assert_array_equal(np.asarray(stored), smooth_image(5, 7, 0))
    with pytest.raises(ValueError, match="truncated"):
        sources.StoredImage.open(str(tmp_path / "t.npy"))
    monkeypatch.undo()  # a header np.save did not write for a uint8 image: the parser, one thread at a time
    with pytest.raises(ValueError, match="not a C-ordered uint8"):
        sources.StoredImage.open(str(tmp_path / "f.npy"))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_cache_file_cut_short_while_training_is_named_in_one_line(div2k_folder, tmp_path, workers):
    root, _ = div2k_folder
    cfg = config(2, source="folder", hr_dirs=str(root / "HR"), lr_dirs=str(root / "LR"), patch_size=8,
                 cache_dir=str(tmp_path / "cache"), num_workers=workers)
    it = data.train_iterator(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
    for path in (tmp_path / "cache").glob("*.hr.npy"):
        with open(path, "r+b") as f:
            f.truncate(200)
    try:
        with pytest.raises(sources.DataError, match=r"cache file .*\.hr\.npy: shorter than when it was opened .*; "
                                                    "something removed or rewrote it") as e:
            take(it, 3)
        assert "\n" not in str(e.value)
    finally:
        it.close()
    gone = sources.StoredImage(str(tmp_path / "cache" / "gone.npy"), (2, 2, 3), 128)
    with pytest.raises(sources.DataError, match="gone.npy: No such file or directory while training"):
        gone[0:1, :]
    os.remove(next((tmp_path / "cache").glob("*.lr.npy")))
    assert len(data.training_pairs(cfg)) == 3  # the next run remakes the damaged and the missing entries


@contextlib.contextmanager
def _demo_with_two_workers():
    """(iterator, its 2 grain worker processes) of a demo-source pipeline, after its first batch; closed after."""
    import multiprocessing
    import time

    cfg = config(2, source="demo", patch_size=8, num_workers=2)
    it = data.train_iterator(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
    try:
        next(it)
        # grain starts each worker from a thread of its own, and a process is listed only once its start() has
        # returned, after the pipeline (megabytes of images) has gone down a pipe to it: under load that was after
        # the first batch, which listed 1 worker (or none).
        deadline = time.monotonic() + 60
        while True:
            workers = [p for p in multiprocessing.active_children() if p.name.startswith("grain-process-prefetch")]
            if len(workers) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert len(workers) == 2
        yield it, workers
    finally:
        it.close()


def test_a_worker_process_that_dies_is_one_line(tmp_path):
    import signal

    with _demo_with_two_workers() as (it, workers):
        for p in workers:  # as the kernel's out-of-memory killer ends a process
            os.kill(p.pid, signal.SIGKILL)
        with pytest.raises(sources.DataError, match=r"a data worker process died at batch \d+ \(killed by SIGKILL, "
                                                    r"as the kernel's out-of-memory killer does\); rerun to resume"):
            take(it, 50)


def test_worker_processes_are_born_deaf_to_ctrl_c(tmp_path):
    """A Ctrl-C while the workers import (seconds) killed each with a KeyboardInterrupt traceback: they must
    start with SIGINT blocked, before the worker_init_fn that ignores it can run."""
    import signal

    with _demo_with_two_workers() as (_, workers):
        for p in workers:
            with open(f"/proc/{p.pid}/status") as f:
                blocked = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
            assert blocked & (1 << (signal.SIGINT - 1)), p.pid
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # this thread: unblocked again


def test_a_changed_image_file_is_not_served_from_the_cache(tmp_path):
    """Same name, same size, same modification time (cp -p, rsync -a, tar x of another image; any BMP of the
    same shape has the same size): the cache kept serving the old image's pixels."""
    from PIL import Image

    path = tmp_path / "HR" / "0001.bmp"
    path.parent.mkdir()
    old, new = smooth_image(40, 40, 0), smooth_image(40, 40, 1)
    Image.fromarray(old).save(path)
    times = os.stat(path)
    cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), patch_size=8, cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(np.asarray(data.training_pairs(cfg)[0]["hr"]), old)
    replacement = tmp_path / "new.bmp"
    Image.fromarray(new).save(replacement)
    os.replace(replacement, path)
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert os.stat(path).st_size == times.st_size
    np.testing.assert_array_equal(np.asarray(data.training_pairs(cfg)[0]["hr"]), new)


def test_a_cache_dir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    write_image(tmp_path / "HR" / "0001.png", smooth_image(40, 40, 0))
    (tmp_path / "file").write_text("x")
    cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), patch_size=8, cache_dir=str(tmp_path / "file" / "c"))
    with pytest.raises(sources.DataError, match=r"cannot write the decoded-image cache in data.cache_dir=.*/file/c "
                                                r"\(Not a directory\); point data.cache_dir"):
        data.training_pairs(cfg)

    def disk_full(file, array):
        file.write(b"\x93NUMPY")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), patch_size=8, cache_dir=str(tmp_path / "c"))
    with pytest.raises(sources.DataError, match=r"data.cache_dir=.*/c \(No space left on device\)"):
        data.training_pairs(cfg)
    assert os.listdir(tmp_path / "c") == []  # no temporary file left behind


def test_ctrl_c_while_the_cache_is_made_does_not_wait_for_the_other_images(tmp_path):
    import signal
    import threading
    import time

    loaded = []

    def load(i):
        loaded.append(i)
        if i == 0:  # a Ctrl-C reaches the main thread, waiting for this image's result
            time.sleep(0.2)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.5)
        return smooth_image(40, 40, i), None

    specs = [sources.PairSpec(f"img{i}", f"key{i}", lambda i=i: load(i)) for i in range(20)]
    with pytest.raises(KeyboardInterrupt):
        sources.prepare_cached(specs, scale=2, min_lr_size=8, cache_dir=str(tmp_path), what="t", threads=1)
    assert loaded == [0]


def test_a_first_run_says_how_many_images_it_decodes_into_the_cache(tmp_path, caplog):
    """DIV2K's first decode takes minutes: a run says so before, in one line; a cached rerun says nothing."""
    for i in range(3):
        write_image(tmp_path / "HR" / f"{i}.png", smooth_image(40, 40, i))
    cache = tmp_path / "cache"
    cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), patch_size=8, cache_dir=str(cache))

    def lines():
        with caplog.at_level(logging.INFO, logger="rnan_jax.sources"):
            caplog.clear()
            data.training_pairs(cfg)
        return [r.getMessage() for r in caplog.records if "decoding" in r.getMessage()]

    assert lines() == [f"training images (folder): decoding 3 of 3 images into {cache} (first use; later runs "
                       "reuse them) ..."]
    assert lines() == []
    os.remove(next(cache.glob("*.lr.npy")))
    assert lines() == [f"training images (folder): decoding 1 of 3 images into {cache} (2 already cached; later "
                       "runs reuse them) ..."]


def _decoded_once_then_watched(tmp_path, monkeypatch, name, image):
    """A folder of big.png and `name` trained on at x3 (HR patch 36) once, which decodes both; then (config, the
    lines said, the paths decoded from now on)."""
    write_image(tmp_path / "HR" / "big.png", smooth_image(40, 40, 0))
    write_image(tmp_path / "HR" / name, image)
    cfg = config(3, source="folder", hr_dirs=str(tmp_path / "HR"), patch_size=12, cache_dir=str(tmp_path / "c"))
    lines = []
    assert [os.path.basename(n) for n in data.training_pairs(cfg, lines.append).names] == ["big.png"]
    assert len(lines) == 1 and "decoding 2 of 2 images" in lines[0]
    decoded = []
    read_rgb = sources.images.read_rgb
    monkeypatch.setattr(sources.images, "read_rgb", lambda path: decoded.append(path) or read_rgb(path))
    return cfg, lines, decoded


def test_a_rerun_neither_decodes_nor_announces_images_too_small_for_the_patch(tmp_path, monkeypatch):
    """classic291 at x4: every run said "decoding 44 of 291 images ... (later runs reuse them)" and decoded the
    skipped images again; they are cached like the others, and still skipped by size."""
    cfg, lines, decoded = _decoded_once_then_watched(tmp_path, monkeypatch, "small.png", smooth_image(30, 45, 1))
    assert [os.path.basename(n) for n in data.training_pairs(cfg, lines.append).names] == ["big.png"]
    assert len(lines) == 1 and decoded == []
    smaller = config(3, source="folder", hr_dirs=str(tmp_path / "HR"), patch_size=10, cache_dir=str(tmp_path / "c"))
    pairs = data.training_pairs(smaller, lines.append)
    assert [os.path.basename(n) for n in pairs.names] == ["big.png", "small.png"] and decoded == []
    np.testing.assert_array_equal(np.asarray(pairs[1]["hr"]), smooth_image(30, 45, 1)[:, :45])
    np.testing.assert_array_equal(np.asarray(pairs[1]["lr"]),
                                  degrade.bicubic_lr(smooth_image(30, 45, 1), 3))

    def read_only(path, write):
        raise PermissionError(13, "Permission denied")

    os.remove(next((tmp_path / "c").glob("*small.png-*.hr.npy")))  # a read-only cache made before small images were
    monkeypatch.setattr(sources.paths, "write_atomically", read_only)  # cached: still usable
    assert [os.path.basename(n) for n in data.training_pairs(cfg).names] == ["big.png"]


def test_the_trainer_s_line_and_a_progress_bar_on_a_terminal_come_from_process_0_only(tmp_path, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for i in range(10):  # enough for a bar
        write_image(tmp_path / "HR" / f"{i}.png", smooth_image(40, 40, i))
    for index, count in ((1, 2), (0, 1)):
        lines, stderr = [], Terminal()
        monkeypatch.setattr("sys.stderr", stderr)
        cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), patch_size=8,
                     cache_dir=str(tmp_path / f"cache{index}"))
        data.train_iterator(cfg, global_batch_size=4, seed=0, process_index=index, process_count=count,
                            announce=lines.append).close()
        monkeypatch.undo()
        if index:
            assert lines == [] and stderr.getvalue() == ""
    assert lines == [f"training images (folder): decoding 10 of 10 images into {tmp_path / 'cache0'} (first use; "
                     "later runs reuse them) ..."]
    assert "decoding:   0%" in stderr.getvalue() and "0/10" in stderr.getvalue()


def test_folder_validation_skips_missing_and_mis_sized_lr_files(tmp_path, caplog):
    for i in range(4):
        write_image(tmp_path / "HR" / f"{i:04d}.png", smooth_image(40, 48, i))
    write_image(tmp_path / "LR" / "0000x2.png", degrade.bicubic_lr(smooth_image(40, 48, 0), 2))
    write_image(tmp_path / "LR" / "0001x2.png", smooth_image(19, 24, 1))  # should be 24x20
    write_image(tmp_path / "LR" / "0003x2.png", degrade.bicubic_lr(smooth_image(40, 48, 3), 2))
    cfg = config(2, val_source="folder", val_dir=str(tmp_path / "HR"), val_lr_dir=str(tmp_path / "LR"),
                 val_max_images=100)  # more than there are
    with caplog.at_level(logging.WARNING):
        val = data.validation_images(cfg)
    assert [p.name for p in val] == ["0000", "0003"]
    for p in val:
        assert p.lr.shape == (20, 24, 3)
    assert "0001x2.png: LR image is 24x19, expected 24x20" in caplog.text
    assert "0002.png: no LR image in" in caplog.text


def test_tfds_validation_skips_an_unusable_example(tmp_path, caplog):
    def examples(builder, split, **kw):
        out = _div2k_examples(split)
        if str(split) == "validation":
            out[0] = {"hr": out[0]["hr"], "lr": out[0]["lr"][:-1]}  # LR one row short
        return out

    cfg = config(4, source="demo", tfds_data_dir=str(tmp_path / "tfds"), val_source="tfds", val_max_images=5)
    with mock_data(as_data_source_fn=examples), caplog.at_level(logging.WARNING):
        val = data.validation_images(cfg)
    assert [p.name for p in val] == ["div2k/bicubic_x4:validation[1]"]
    assert "validation[0]: LR image is 24x15" in caplog.text


def test_val_max_images_counts_usable_images_and_reads_no_further(tmp_path, caplog):
    """val_max_images=2 means the first 2 images that can be scored: a corrupt or too small file before them
    does not count, and files after the second usable one are not read (a big folder is not decoded)."""
    hr_dir = tmp_path / "HR"
    (hr_dir / "0000.png").parent.mkdir()
    (hr_dir / "0000.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    write_image(hr_dir / "0001.png", smooth_image(40, 48, 1))
    write_image(hr_dir / "0002.png", smooth_image(12, 12, 2))  # under the 15 px a side scored at x2
    write_image(hr_dir / "0003.png", smooth_image(40, 48, 3))
    (hr_dir / "0004.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png either")
    cfg = config(2, val_source="folder", val_dir=str(hr_dir), val_max_images=2)
    with caplog.at_level(logging.WARNING):
        val = data.validation_images(cfg)
    assert [p.name for p in val] == ["0001", "0003"]
    assert "0000.png" in caplog.text and "0002.png" in caplog.text
    assert "0004.png" not in caplog.text

    reads = []

    class Examples(list):
        def __getitem__(self, i):
            reads.append(i)
            if i == 3:
                raise OSError("damaged record")
            return super().__getitem__(i)

    def examples(builder, split, **kw):
        out = [{"hr": coordinate_image(64, 96, i), "lr": coordinate_image(64, 96, i)[::4, ::4]} for i in range(4)]
        out[0]["lr"] = out[0]["lr"][:-1]  # LR one row short
        return Examples(out)

    cfg = config(4, source="demo", tfds_data_dir=str(tmp_path / "tfds"), val_source="tfds", val_max_images=2)
    with mock_data(as_data_source_fn=examples):
        val = data.validation_images(cfg)
    assert [p.name for p in val] == ["div2k/bicubic_x4:validation[1]", "div2k/bicubic_x4:validation[2]"]
    assert reads == [0, 1, 2]


def test_folders_that_cannot_be_listed_are_one_line(tmp_path, monkeypatch, caplog):
    """An HR or LR folder this user may not list (chmod 000, another user's copy) stopped training and
    validation with a PermissionError traceback, and an unlistable LR folder was one warning per image before
    "no usable image". (os.listdir is refused by hand: root lists a chmod 000 folder.)"""
    from rnan_jax import benchmark_sets, images

    for i in range(3):
        write_image(tmp_path / "S" / "HR" / f"{i:04d}.png", smooth_image(40, 40, i))
        write_image(tmp_path / "S" / "LR_bicubic" / "X2" / f"{i:04d}x2.png", smooth_image(20, 20, i))
    denied = set()
    listdir = os.listdir

    def refusing(path="."):
        if os.path.abspath(path) in denied:
            raise PermissionError(13, "Permission denied", path)
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refusing)
    hr, lr = str(tmp_path / "S" / "HR"), str(tmp_path / "S" / "LR_bicubic")
    train = config(2, source="folder", hr_dirs=hr, lr_dirs=lr, patch_size=8, cache_dir=str(tmp_path / "c"))
    val = config(2, val_source="benchmark", val_set="S", val_dir=str(tmp_path))
    denied.add(hr)
    with pytest.raises(sources.DataError) as e:
        data.training_pairs(train)
    assert str(e.value) == f"training images: {hr}: cannot list the folder (Permission denied)"
    with pytest.raises(sources.DataError) as e:
        data.validation_images(val)
    assert str(e.value) == f"validation images (benchmark): {hr}: cannot list the folder (Permission denied)"
    with pytest.raises(images.ImageError, match=f"^{hr}: cannot list the folder \\(Permission denied\\)$"):
        benchmark_sets.list_hr(str(tmp_path), str(tmp_path / "S"))
    for folder in (lr, os.path.join(lr, "X2")):
        denied = {folder}
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(sources.DataError) as e:
            data.training_pairs(train)
        assert str(e.value) == f"training images: {folder}: cannot list the LR folder (Permission denied)"
        assert not caplog.records  # said once, in the error
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(sources.DataError) as e:
        data.validation_images(val)  # LR_bicubic/X2 beside HR: each image was skipped, in one line each
    assert str(e.value) == (f"validation images (benchmark): {lr}/X2: cannot list the LR folder (Permission "
                            "denied)")
    assert not caplog.records


def test_an_lr_file_written_without_the_hr_photo_s_exif_orientation_lines_up(tmp_path):
    """A phone photo (stored pixels + an EXIF orientation tag) whose LR file was made from the stored pixels and
    written without the tag (MATLAB's imread ignores it): the HR alone was turned, so a square pair trained and
    validated misaligned, and a landscape one was skipped as mis-sized. An LR made from the upright image (as
    OpenCV reads it) is still read as it is, and so is a pair whose files have the same tag."""
    from PIL import Image, ImageOps

    def turned(pixels, orientation):  # as a viewer shows the stored pixels under the tag
        im = Image.fromarray(pixels)
        im.getexif()[0x0112] = orientation
        return np.asarray(ImageOps.exif_transpose(im))

    def save(path, pixels, orientation=1):
        path.parent.mkdir(parents=True, exist_ok=True)
        exif = Image.Exif()
        if orientation != 1:
            exif[0x0112] = orientation
        Image.fromarray(pixels).save(path, quality=100, subsampling=0, exif=exif.tobytes())

    upright = {}
    cases = [("square", (48, 48), 3, "stored"), ("wide", (40, 64), 6, "stored"), ("flip", (40, 64), 2, "stored"),
             ("upright", (48, 48), 8, "upright"), ("both", (48, 48), 3, "both")]
    for name, (h, w), tag, lr_from in cases:
        stored = smooth_image(h, w, len(upright))
        upright[name] = turned(stored, tag)
        save(tmp_path / "HR" / f"{name}.jpg", stored, tag)
        lr_source = upright[name] if lr_from == "upright" else stored
        save(tmp_path / "LR" / "X2" / f"{name}x2.jpg", degrade.bicubic_lr(np.ascontiguousarray(lr_source), 2),
             tag if lr_from == "both" else 1)
    # the decoded HR is the upright image, so an aligned LR is close to its bicubic_lr (JPEG: within a few levels)
    cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), lr_dirs=str(tmp_path / "LR"), patch_size=8,
                 cache_dir=str(tmp_path / "c"))
    pairs = data.training_pairs(cfg)
    assert sorted(os.path.basename(n) for n in pairs.names) == sorted(f"{c[0]}.jpg" for c in cases)
    for i, path in enumerate(pairs.names):
        hr, lr = np.asarray(pairs[i]["hr"]), np.asarray(pairs[i]["lr"])
        name = os.path.basename(path)[:-4]
        assert hr.shape == upright[name].shape and np.abs(hr.astype(int) - upright[name]).mean() < 2, name
        assert np.abs(lr.astype(int) - degrade.bicubic_lr(hr, 2)).mean() < 2, name
    val = data.validation_images(config(2, val_source="folder", val_dir=str(tmp_path / "HR"),
                                        val_lr_dir=str(tmp_path / "LR"), val_max_images=0))
    assert sorted(p.name for p in val) == sorted(c[0] for c in cases)
    for p in val:
        assert np.abs(p.lr.astype(int) - degrade.bicubic_lr(p.hr, 2)).mean() < 2, p.name



def test_a_png_whose_exif_orientation_follows_the_pixels_lines_up_with_its_lr_file(tmp_path):
    """The PNG spec lets the eXIf chunk follow the image data, and Pillow's decode turns such an HR image upright;
    its orientation was read from the header alone (none), so the LR file made from its stored pixels was not
    lined up: a square pair trained misaligned (mean |LR - bicubic_lr(HR)| 25 levels), a wide one was skipped."""
    import io
    import struct
    import zlib

    from PIL import Image

    def late_exif_png(pixels, orientation):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        exif = Image.Exif()
        exif[0x0112] = orientation
        body = exif.tobytes()
        chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
        end = buf.getvalue().rindex(b"IEND") - 4
        return buf.getvalue()[:end] + chunk + buf.getvalue()[end:]

    (tmp_path / "HR").mkdir()
    stored = {}
    for name, (h, w), tag in (("square", (48, 48), 3), ("wide", (40, 64), 6)):
        stored[name] = smooth_image(h, w, h)
        (tmp_path / "HR" / f"{name}.png").write_bytes(late_exif_png(stored[name], tag))
        write_image(tmp_path / "LR" / "X2" / f"{name}x2.png", degrade.bicubic_lr(stored[name], 2))
    assert sources.images.decode(tmp_path / "HR" / "wide.png").pixels.shape == (64, 40, 3)  # Pillow turns it
    cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), lr_dirs=str(tmp_path / "LR"), patch_size=8,
                 cache_dir=str(tmp_path / "c"))
    pairs = data.training_pairs(cfg)
    assert [os.path.basename(n) for n in pairs.names] == ["square.png", "wide.png"]
    for i, (name, turn) in enumerate((("square", lambda a: a[::-1, ::-1]), ("wide", lambda a: np.rot90(a, -1)))):
        hr, lr = np.asarray(pairs[i]["hr"]), np.asarray(pairs[i]["lr"])
        np.testing.assert_array_equal(hr, turn(stored[name]))
        np.testing.assert_array_equal(lr, degrade.bicubic_lr(hr, 2))
    # validation (and evaluate) read the orientation apart: the same pairs, the wide one was skipped
    val = data.validation_images(config(2, val_source="folder", val_dir=str(tmp_path / "HR"),
                                        val_lr_dir=str(tmp_path / "LR"), val_max_images=0))
    assert [p.name for p in val] == ["square", "wide"]
    for p in val:
        np.testing.assert_array_equal(p.lr, degrade.bicubic_lr(p.hr, 2))

def test_a_rerun_neither_decodes_nor_announces_unusable_images(tmp_path, monkeypatch, caplog):
    """Files that are not images (an HTML error page saved as .png by a failed download, an empty file): every
    run said "decoding 2 of 4 images ... (2 already cached; later runs reuse them)" and tried them again. The
    reason is kept in the cache; the image is still skipped by name, and a replaced file is tried again."""
    for i in range(2):
        write_image(tmp_path / "HR" / f"{i}.png", smooth_image(40, 40, i))
        (tmp_path / "HR" / f"bad{i}.png").write_bytes(b"<html>404 Not Found</html>" if i else b"")
    cache = tmp_path / "cache"
    cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), patch_size=8, cache_dir=str(cache))
    decoded = []
    decode = sources.images.decode
    monkeypatch.setattr(sources.images, "decode", lambda path, **kw: decoded.append(os.path.basename(path))
                        or decode(path, **kw))

    def run():
        decoded.clear()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="rnan_jax.sources"):
            pairs = data.training_pairs(cfg)
        assert sorted(os.path.basename(n) for n in pairs.names) == ["0.png", "1.png"]
        assert "skipped 2 of 4 images (2 unreadable or without a matching LR image)" in caplog.text
        assert f"skipping {tmp_path / 'HR' / 'bad1.png'}: cannot read image" in caplog.text
        return sorted(decoded), [r.getMessage() for r in caplog.records if "decoding" in r.getMessage()]

    assert run() == (["0.png", "1.png", "bad0.png", "bad1.png"], [
        f"training images (folder): decoding 4 of 4 images into {cache} (first use; later runs reuse them) ..."])
    assert run() == ([], [])
    (tmp_path / "HR" / "bad1.png").unlink()
    write_image(tmp_path / "HR" / "bad1.png", smooth_image(40, 40, 5))  # downloaded again: used
    decoded.clear()
    with caplog.at_level(logging.INFO, logger="rnan_jax.sources"):
        assert len(data.training_pairs(cfg)) == 3
    assert decoded == ["bad1.png"]
    # a TFDS record's failure may be a passing read error (gs://), and its key stays: tried again, not remembered
    def examples(builder, split, **kw):
        out = _div2k_examples(split)
        return [{"hr": out[0]["hr"], "lr": out[0]["lr"][:-1]}] + out[1:]

    tfds_cache = tmp_path / "tfds_cache"
    with mock_data(as_data_source_fn=examples):
        assert len(data.training_pairs(config(4, source="tfds", tfds_data_dir=str(tmp_path / "tfds"), patch_size=6,
                                              cache_dir=str(tfds_cache)))) == 2
    assert len(list(tfds_cache.glob("*.npy"))) == 4 and not list(tfds_cache.glob("*.unusable.txt"))


def test_tfds_examples_of_gray_rgba_or_16_bit_pixels_are_made_rgb_uint8(tmp_path):
    """A TFDS dataset of "hr"/"lr" images whose features are [H, W, 1] (gray) or RGBA was cached with 1 or 4
    channels, and the first batch mixing them was grain's traceback; uint16 pixels were cast modulo 256."""
    gray = coordinate_image(32, 32, 7)[..., :1]
    rgba = np.concatenate([coordinate_image(32, 32, 9), np.full((32, 32, 1), 128, np.uint8)], axis=-1)
    deep = (coordinate_image(32, 32, 11).astype(np.uint16) * 257)  # 16-bit: x257 of the 8-bit values
    examples = [{"hr": im, "lr": im[::4, ::4].copy()} for im in (coordinate_image(32, 32, 5), gray, rgba, deep)]
    cfg = config(4, source="tfds", tfds_data_dir=str(tmp_path / "tfds"), patch_size=4,
                 cache_dir=str(tmp_path / "cache"))

    def rgb_pairs():
        with mock_data(as_data_source_fn=lambda builder, split, **kw: examples):
            pairs = data.training_pairs(cfg)
            it = data.train_iterator(cfg, global_batch_size=8, seed=0, process_index=0, process_count=1)
            try:
                batch = next(it)
            finally:
                it.close()
        assert batch["lr"].shape == (8, 4, 4, 3) and batch["hr"].shape == (8, 16, 16, 3)
        return [(np.asarray(pairs[i]["hr"]), np.asarray(pairs[i]["lr"])) for i in range(len(pairs))]

    expected = [coordinate_image(32, 32, 5), np.repeat(gray, 3, axis=-1), rgba[..., :3], coordinate_image(32, 32, 11)]
    for (hr, lr), want in zip(rgb_pairs(), expected, strict=True):
        np.testing.assert_array_equal(hr, want)
        np.testing.assert_array_equal(lr, want[::4, ::4])
    # entries made before (the gray example stored with 1 channel) are made again, not served
    for path in (tmp_path / "cache").glob("*train_1_*.npy"):
        np.save(path, np.load(path)[..., :1])
    np.testing.assert_array_equal(rgb_pairs()[1][0], expected[1])
    with pytest.raises(images.ImageError, match=r"x: the HR image has float32 samples; give uint8, uint16 or "):
        sources.make_pair(np.zeros((8, 8, 3), np.float32), None, 2, "x")
    with pytest.raises(images.ImageError, match=r"x: the LR image has shape \(4, 4, 5\), not \[H, W\]"):
        sources.make_pair(np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4, 5), np.uint8), 2, "x")


def test_a_rerun_neither_decodes_nor_announces_images_narrower_than_the_scale(tmp_path, monkeypatch, caplog):
    """An image with a side below the scale (not one LR pixel: a 2-pixel strip at x3) has no cache entry to make;
    every run decoded it again and said "decoding 1 of 2 images ... (later runs reuse them)". It is remembered as
    too small, and skipped as such, naming its size."""
    _, lines, decoded = _decoded_once_then_watched(tmp_path, monkeypatch, "strip.png", smooth_image(2, 45, 1))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rnan_jax"):
        for patch in (12, 4):  # another patch size: the size in the line is that run's
            run = config(3, source="folder", hr_dirs=str(tmp_path / "HR"), patch_size=patch,
                         cache_dir=str(tmp_path / "c"))
            assert [os.path.basename(n) for n in data.training_pairs(run, lines.append).names] == ["big.png"]
    assert len(lines) == 1 and decoded == []
    warnings = [r.getMessage() for r in caplog.records]
    for hr_patch in (36, 12):
        assert f"skipping {tmp_path}/HR/strip.png: 45x2 is smaller than the {hr_patch}-pixel HR patch (x3)" in warnings
        assert (f"training images (folder): skipped 1 of 2 images (1 smaller than the {hr_patch}-pixel HR patch)"
                in warnings)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's open files in /proc")
def test_batches_kept_from_worker_processes_hold_no_open_files(tmp_path):
    """grain hands a worker's batch over as arrays in shared memory, each holding a file descriptor and a mapping
    until freed: a script keeping its batches failed with "Too many open files" after about 270 (at the common
    limit of 1024), and each batch still held at exit printed a traceback. The batches are ordinary arrays."""
    cfg = config(2, source="demo", patch_size=8, num_workers=1)
    it = data.train_iterator(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
    try:
        first = next(it)
        before = len(os.listdir("/proc/self/fd"))
        kept = take(it, 60)
        after = len(os.listdir("/proc/self/fd"))
    finally:
        it.close()
    assert after - before < 20, (before, after)  # 2 arrays a batch: about 120 more before
    assert all(type(v) is np.ndarray for b in [first, *kept] for v in b.values())
    reference = config(2, source="demo", patch_size=8, num_workers=0)
    it = data.train_iterator(reference, global_batch_size=4, seed=0, process_index=0, process_count=1)
    try:
        assert_batches_equal([first, *kept], take(it, 61))
    finally:
        it.close()


def test_image_folders_and_the_cache_given_as_urls_are_one_line_at_setup():
    """data.hr_dirs=gs://... (or val_dir, lr_dirs, cache_dir) was "no such folder" of objects that are there, after
    setup, or (cache_dir) a local folder named gs:."""
    for key, value, advice in (
            ("hr_dirs", "/data/a, gs://bucket/b", "copy the images here first, e.g. gcloud storage cp -r; TFDS reads "
             "gs:// itself: data.tfds_data_dir"),
            ("cache_dir", "gs://bucket/cache", "the decoded-image cache is on local disk")):
        url = value.split(",")[-1].strip()
        with pytest.raises(ValueError) as e:
            data.DataConfig.from_config({"source": "folder", "hr_dirs": "/data/a", key: value}, scale=2)
        assert str(e.value) == f"data.{key} {url}: a URL, but this takes a local path only ({advice})"
    cfg = data.DataConfig.from_config({"source": "tfds", "tfds_data_dir": "gs://bucket/tfds"}, scale=2)
    assert cfg.tfds_data_dir == "gs://bucket/tfds"  # TFDS reads it


def _edsr_div2k(root, numbers, scale=2):
    """EDSR's DIV2K layout: DIV2K_train_HR/0001.png.. (valid images merged in) and
    DIV2K_train_LR_bicubic/X<s>/0001x<s>.png..; HR of image n is coordinate-coded with tag n, LR its every s-th
    pixel."""
    hr_dir, lr_dir = root / "DIV2K_train_HR", root / "DIV2K_train_LR_bicubic"
    for n in numbers:
        hr = coordinate_image(32 + 2 * n, 40, tag=n)
        write_image(hr_dir / f"{n:04d}.png", hr)
        write_image(lr_dir / f"X{scale}" / f"{n:04d}x{scale}.png", hr[::scale, ::scale])
    return str(hr_dir), str(lr_dir)


def test_hr_range_and_val_range_split_one_div2k_folder_as_edsr_s_data_range(tmp_path):
    """EDSR's --data_range 1-800/801-810 on its one DIV2K folder: every file of data.hr_dirs was trained on, the
    validation images too, and val_dir could not take 801-810 of that folder (its first files were the training
    images). Ranges are by the file name's number; each LR file is the one of the same number after the filter."""
    hr_dir, lr_dir = _edsr_div2k(tmp_path, range(1, 8))
    write_image(tmp_path / "DIV2K_train_HR" / "readme.png", coordinate_image(40, 40, 99))  # not a number: left out
    cfg = config(2, source="folder", hr_dirs=hr_dir, lr_dirs=lr_dir, hr_range="2-4", val_source="folder",
                 val_dir=hr_dir, val_lr_dir=lr_dir, val_range=" 6 - 7", patch_size=8, cache_dir=str(tmp_path / "c"))
    assert (cfg.hr_range, cfg.val_range) == (((2, 4),), (6, 7))
    pairs = data.training_pairs(cfg)
    assert [os.path.basename(n) for n in pairs.names] == ["0002.png", "0003.png", "0004.png"]
    for i, n in enumerate((2, 3, 4)):
        hr, lr = np.asarray(pairs[i]["hr"]), np.asarray(pairs[i]["lr"])
        assert hr.shape == (32 + 2 * n, 40, 3) and (hr[..., 2] == n).all() and (lr[..., 2] == n).all()
        np.testing.assert_array_equal(lr, hr[::2, ::2])
    val = data.validation_images(cfg)
    assert [p.name for p in val] == ["0006", "0007"]
    for p, n in zip(val, (6, 7)):
        assert (p.hr[..., 2] == n).all()
        np.testing.assert_array_equal(p.lr, p.hr[::2, ::2])
    # one range per HR folder, an empty one for a whole folder (DIV2K 1-800 then all of Flickr2K)
    other = tmp_path / "Flickr2K"
    for n in (1, 2):
        write_image(other / f"{n:06d}.png", coordinate_image(40, 40, 50 + n))
    cfg = config(2, source="folder", hr_dirs=f"{hr_dir},{other}", hr_range="1-2,", patch_size=8,
                 cache_dir=str(tmp_path / "c"))
    assert cfg.hr_range == ((1, 2), None)
    assert [os.path.relpath(n, tmp_path) for n in data.training_pairs(cfg).names] == [
        "DIV2K_train_HR/0001.png", "DIV2K_train_HR/0002.png", "Flickr2K/000001.png", "Flickr2K/000002.png"]


def test_image_ranges_that_are_malformed_overlap_or_match_nothing_are_one_line(tmp_path):
    hr_dir, lr_dir = _edsr_div2k(tmp_path, (801, 802, 803))
    folder = {"source": "folder", "hr_dirs": hr_dir, "cache_dir": str(tmp_path / "c"), "patch_size": 8}
    for given, message in (
            ({"hr_range": "1-800/801-810"}, "data.hr_range '1-800/801-810' is not a range of image numbers: give "
             "'FIRST-LAST' (both included, e.g. '1-800') or 'N'; EDSR's --data_range 1-800/801-810 is "
             "data.hr_range='1-800' and data.val_range='801-810'"),
            ({"hr_range": "800-1"}, "data.hr_range '800-1' is empty: its first number, 800, is above its last, 1"),
            ({"val_source": "folder", "val_dir": hr_dir, "hr_range": "801", "val_range": "0x10"},
             "data.val_range '0x10' is not a range of image numbers: give 'FIRST-LAST' (both included, e.g. '1-800') "
             "or 'N'"),
            ({"hr_range": "1-800,"}, "data.hr_range gives 2 ranges for the 1 folders of data.hr_dirs: give one per "
             "folder, comma-separated, an empty one for a whole folder (e.g. '1-800,')"),
            ({"source": "demo", "hr_dirs": "", "hr_range": "1-800"},
             "data.hr_range is set but nothing reads it: data.source is 'demo'; set --config.data.source=folder to "
             "train on it"),
            ({"val_range": "801-810"}, "data.val_range is set but nothing reads it: data.val_source is 'demo'"),
            # the same folder through another spelling of its path: still the training images
            ({"val_source": "folder", "val_dir": hr_dir + "/", "hr_range": "1-801", "val_range": "801-810"},
             f"data.val_dir {hr_dir}/ is also a training folder (data.hr_dirs) and data.val_range 801-810 overlaps "
             "data.hr_range 1-801 there: the run would validate on images it trains on"),
            ({"val_source": "folder", "val_dir": hr_dir},
             f"data.val_dir {hr_dir} is also a training folder (data.hr_dirs) and data.hr_range takes the whole "
             "folder: the run would validate on images it trains on"),
            ({"val_source": "folder", "val_dir": hr_dir, "hr_range": "801"},
             f"data.val_dir {hr_dir} is also a training folder (data.hr_dirs) and data.val_range takes the whole "
             "folder: the run would validate on images it trains on"),
            ({"hr_range": "1-800/801-", "val_range": ""},
             "data.hr_range '1-800/801-' is not a range of image numbers: give 'FIRST-LAST' (both included, e.g. "
             "'1-800') or 'N'")):
        with pytest.raises(ValueError) as e:
            config(4, **{**folder, **given})
        disjoint = "; give disjoint ranges, e.g. data.hr_range='1-800' and data.val_range='801-810' for DIV2K"
        assert str(e.value) == (message + disjoint if message.endswith("trains on") else message)
    cfg = config(4, **folder, hr_range="1-800", lr_dirs=lr_dir)
    with pytest.raises(sources.DataError) as e:
        data.training_pairs(cfg)
    assert str(e.value) == (f"training images: data.hr_range 1-800 matches no image in {hr_dir} (its 3 numbered "
                            "images are 801-803)")
    cfg = config(4, val_source="folder", val_dir=hr_dir, val_lr_dir=lr_dir, val_range="900")
    with pytest.raises(sources.DataError) as e:
        data.validation_images(cfg)
    assert str(e.value) == (f"validation images (folder): data.val_range 900 matches no image in {hr_dir} (its 3 "
                            "numbered images are 801-803)")


def test_an_image_range_gives_every_process_the_same_images(tmp_path):
    """Each process filters the folder alike: the global batches are the one-process ones, cut only from the
    range's images, and every process's ImageList (which the trainer compares) is that of a folder holding only
    those images."""
    for n in range(1, 9):  # constant images: a patch's value says which image it came from
        write_image(tmp_path / "HR" / f"{n:04d}.png", np.full((40, 48, 3), 20 * n, np.uint8))
        if 3 <= n <= 6:
            write_image(tmp_path / "only" / f"{n:04d}.png", np.full((40, 48, 3), 20 * n, np.uint8))
    cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), hr_range="3-6", patch_size=8,
                 cache_dir=str(tmp_path / "c"))
    one = data.train_iterator(cfg, global_batch_size=8, seed=0, process_index=0, process_count=1)
    batches = take(one, 4)
    assert {int(v) // 20 for b in batches for v in b["hr"][:, 0, 0, 0]} == {3, 4, 5, 6}
    only = config(2, source="folder", hr_dirs=str(tmp_path / "only"), patch_size=8, cache_dir=str(tmp_path / "c"))
    assert one.images == data.train_iterator(only, global_batch_size=8, seed=0, process_index=0,
                                             process_count=1).images
    parts = [data.train_iterator(cfg, global_batch_size=8, seed=0, process_index=i, process_count=2) for i in (0, 1)]
    assert parts[0].images == parts[1].images == one.images
    got = [take(p, 4) for p in parts]
    for k in range(4):
        assert_batches_equal([{key: np.concatenate([g[k][key] for g in got]) for key in ("lr", "hr")}], [batches[k]])


def test_ranges_and_folders_given_from_python_as_tuples_are_read_as_the_text_form(tmp_path):
    """DataConfig.from_config takes a dict (a notebook, the resolved values of another DataConfig): data.hr_range
    given as ("1-800", "") was read as the text "('1-800', '')" and refused as "'('1-800'" is not a range", (801, 810)
    for val_range as "'(801, 810)' is not a range", and hr_dirs as a tuple was an AttributeError traceback. Each is now
    read as the comma-separated text it means; a bare pair of ints for hr_range (one range, or one image of each of
    two folders?) and anything else are refused in one line naming the key and the forms it takes."""
    hr_dir, _ = _edsr_div2k(tmp_path, (1, 2, 3))
    other = str(tmp_path / "Flickr2K")
    os.makedirs(other)
    text = config(2, source="folder", hr_dirs=f"{hr_dir},{other}", hr_range="1-2,", val_source="folder",
                  val_dir=hr_dir, val_range="3")
    for given in ({"hr_dirs": (hr_dir, other), "hr_range": ("1-2", ""), "val_range": (3, 3)},
                  {"hr_dirs": [hr_dir, other], "hr_range": [(1, 2), None], "val_range": 3},
                  {"hr_dirs": (hr_dir, other), "hr_range": ((1, 2), None), "val_range": [3, 3]}):
        cfg = config(2, **{"source": "folder", "val_source": "folder", "val_dir": hr_dir, **given})
        assert (cfg.hr_dirs, cfg.hr_range, cfg.val_range) == ((hr_dir, other), ((1, 2), None), (3, 3)) == (
            text.hr_dirs, text.hr_range, text.val_range)
    resolved = {k: getattr(text, k) for k in ("source", "hr_dirs", "hr_range", "val_source", "val_dir", "val_range")}
    assert config(2, **resolved) == text  # a DataConfig's own values
    assert config(2, source="folder", hr_dirs=hr_dir, hr_range=2).hr_range == ((2, 2),)
    forms = ("a text of ranges, one per data.hr_dirs folder, comma-separated ('1-800' or '1-800,'), or a tuple of one "
             "per folder, each 'FIRST-LAST', 'N', '' (the whole folder), (FIRST, LAST) or None (('1-800', '') or "
             "((1, 800), None))")
    for given, message in (
            ({"hr_range": (1, 800)}, "data.hr_range (1, 800) is ambiguous: one range per data.hr_dirs folder, so "
             f"'1-800' or ((1, 800),) for one folder; give {forms}"),
            ({"hr_range": (1.5,)}, f"data.hr_range 1.5 is not a range of image numbers: give {forms}"),
            ({"hr_range": {"first": 1}}, f"data.hr_range {{'first': 1}} is not a range of image numbers: give {forms}"),
            ({"hr_range": ((800, 1),)}, "data.hr_range '800-1' is empty: its first number, 800, is above its last, 1"),
            ({"val_source": "folder", "val_dir": hr_dir, "hr_range": "1", "val_range": ("801-810",)},
             "data.val_range ('801-810',) is not a range of image numbers: give 'FIRST-LAST' (both included, e.g. "
             "'801-810'), 'N', (FIRST, LAST) or '' (every file)")):
        with pytest.raises(ValueError) as e:
            config(2, **{"source": "folder", "hr_dirs": hr_dir, **given})
        assert str(e.value) == message


def test_an_image_that_a_passing_system_error_failed_is_read_again_by_the_next_run(tmp_path, monkeypatch, caplog):
    """A read that the system failed once (EIO from a loaded NFS or gcsfuse mount) was kept in the cache as the
    image's reason to be unusable: every later run, of every host sharing the cache, skipped the image for good
    ("cannot read image ([Errno 5] Input/output error)") although it read well. Such a failure is now tried
    again; a file whose content cannot be read (not an image, cut short) is still remembered."""
    import errno

    for i in range(3):
        write_image(tmp_path / "HR" / f"{i}.png", smooth_image(40, 40, i))
    (tmp_path / "HR" / "bad.png").write_bytes(b"<html>404 Not Found</html>")
    cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), patch_size=8, cache_dir=str(tmp_path / "cache"))
    real = images.Image.open

    def failing_once(f, *args, **kwargs):
        if os.path.basename(getattr(f, "name", "")) == "1.png":
            raise OSError(errno.EIO, "Input/output error")
        return real(f, *args, **kwargs)

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="rnan_jax.sources"):
        m.setattr(images.Image, "open", failing_once)
        assert sorted(os.path.basename(n) for n in data.training_pairs(cfg).names) == ["0.png", "2.png"]
    assert f"skipping {tmp_path / 'HR' / '1.png'}: cannot read image ([Errno 5] Input/output error)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rnan_jax.sources"):
        pairs = data.training_pairs(cfg)
    assert sorted(os.path.basename(n) for n in pairs.names) == ["0.png", "1.png", "2.png"]
    hr = np.asarray(pairs[[os.path.basename(n) for n in pairs.names].index("1.png")]["hr"])
    np.testing.assert_array_equal(hr, smooth_image(40, 40, 1))
    assert "Errno 5" not in caplog.text and "skipped 1 of 4 images" in caplog.text  # bad.png, from the cache
    [kept] = (tmp_path / "cache").glob("*.unusable.txt")  # bad.png's reason alone
    assert kept.read_text().endswith("bad.png: cannot read image (cannot identify image file)")


def test_patches_come_from_every_place_also_in_an_image_of_exactly_the_patch_s_size(tmp_path):
    """An LR image of exactly the patch size is used (its one patch at (0, 0)), and in an LR image one pixel larger
    each way the patch starts at all 4 places, the last row and column included (LR = HR's every 2nd pixel)."""
    for n, side in ((1, 16), (2, 18)):  # x2, patch 8: LR 8x8 and 9x9
        hr = coordinate_image(side, side, tag=10 * n)
        write_image(tmp_path / "HR" / f"{n:04d}.png", hr)
        write_image(tmp_path / "LR" / "X2" / f"{n:04d}x2.png", hr[::2, ::2])
    cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), lr_dirs=str(tmp_path / "LR"), patch_size=8,
                 cache_dir=str(tmp_path / "c"))
    places = {10: set(), 20: set()}
    for batch in take(data.train_iterator(cfg, global_batch_size=8, seed=0, process_index=0, process_count=1), 12):
        for lr, hr in zip(batch["lr"], batch["hr"]):
            tag = int(lr[0, 0, 2])
            side = {10: 16, 20: 18}[tag]
            full_hr = coordinate_image(side, side, tag)
            y, x, _ = match_patch(lr, hr, full_hr[::2, ::2], full_hr, 2)
            places[tag].add((y, x))
    assert places == {10: {(0, 0)}, 20: {(0, 0), (0, 1), (1, 0), (1, 1)}}


def test_each_epoch_shows_every_image_its_number_of_copies_in_a_new_order(tmp_path, monkeypatch):
    """The shuffled unit (an epoch) is every image repeated ceil(_MIN_SHUFFLE_LENGTH / count) times: with more
    images than that length (a folder of 30k pre-cut sub-images), one copy each; each epoch in another order."""
    for i in range(7):  # constant images: a patch's value says which image it came from
        write_image(tmp_path / "HR" / f"{i}.png", np.full((40, 48, 3), 30 * (i + 1), np.uint8))
    cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), patch_size=8, cache_dir=str(tmp_path / "c"))
    for length, copies in ((4, 1), (7, 1), (8, 2)):
        monkeypatch.setattr(data, "_MIN_SHUFFLE_LENGTH", length)
        it = data.train_iterator(cfg, global_batch_size=7 * copies, seed=0, process_index=0, process_count=1)
        orders = [tuple(int(v) // 30 - 1 for v in b["hr"][:, 0, 0, 0]) for b in take(it, 4)]  # a batch per epoch
        for order in orders:
            assert sorted(order) == sorted(list(range(7)) * copies), (length, order)
        assert len(set(orders)) == 4 and tuple(sorted(orders[0])) not in orders, (length, orders)


def test_tfds_pixels_of_16_bits_or_gray_and_alpha_and_an_hr_larger_than_scale_times_lr(tmp_path):
    """A 16-bit example reads as the same image in a 16-bit PNG file does (rounded, not its high byte); a gray +
    alpha example is its gray channel; an HR image larger than scale x LR is cut to it top-left (DIV2K's
    convention) in both sides, for training and for validation."""
    deep = np.random.default_rng(0).integers(0, 65536, (24, 20, 3), dtype=np.uint16)
    write_image(tmp_path / "deep.png", deep)  # a 16-bit PNG
    from_file = images.read_rgb(tmp_path / "deep.png")
    hr, lr = sources.make_pair(deep, deep[::4, ::4], 4, "deep")
    np.testing.assert_array_equal(hr, from_file)
    assert np.array_equal(from_file, np.rint(deep / 257.0).astype(np.uint8)) and not np.array_equal(hr, deep >> 8)
    gray = smooth_image(16, 16, 1)[..., 0]
    alpha = np.full_like(gray, 200)
    hr, lr = sources.make_pair(np.stack([gray, alpha], -1), np.stack([gray, alpha], -1)[::2, ::2], 2, "gray+alpha")
    np.testing.assert_array_equal(hr, np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(lr, np.repeat(gray[::2, ::2, None], 3, -1))
    big = smooth_image(67, 98, 2)  # x4 LR 16x24 of HR 64x96, 3 rows and 2 columns over
    hr, lr = sources.make_pair(big, big[:64:4, :96:4], 4, "big")
    np.testing.assert_array_equal(hr, big[:64, :96])
    examples = [{"hr": big, "lr": big[:64:4, :96:4].copy()}]
    cfg = config(4, source="tfds", tfds_data_dir=str(tmp_path / "tfds"), patch_size=4,
                 cache_dir=str(tmp_path / "cache"), val_source="tfds")
    with mock_data(as_data_source_fn=lambda builder, split, **kw: examples):
        np.testing.assert_array_equal(np.asarray(data.training_pairs(cfg)[0]["hr"]), big[:64, :96])
        [pair] = data.validation_images(cfg)
    np.testing.assert_array_equal(pair.hr, big[:64, :96])


def test_one_cache_folder_serves_each_scale_its_own_lr_images(tmp_path):
    """Runs at x2 then x4 (or x4 then x2) sharing data.cache_dir: each gets its own bicubic LR of the HR cut to a
    multiple of its scale, none the other's entries."""
    hr_full = smooth_image(50, 62, 3)
    write_image(tmp_path / "HR" / "a.png", hr_full)
    for scale in (2, 4, 2):
        cfg = config(scale, source="folder", hr_dirs=str(tmp_path / "HR"), patch_size=4,
                     cache_dir=str(tmp_path / "cache"))
        [hr, lr] = (np.asarray(data.training_pairs(cfg)[0][k]) for k in ("hr", "lr"))
        h, w = 50 // scale * scale, 62 // scale * scale
        np.testing.assert_array_equal(hr, hr_full[:h, :w])
        np.testing.assert_array_equal(lr, degrade.imresize(hr_full[:h, :w], 1 / scale))


def test_the_demo_validation_image_is_the_centre_of_the_left_motorcycle_view():
    """The centre 320x240 of stereo_motorcycle()[0] (741x500): rows 130..369, columns 210..529 (x3: 318 wide)."""
    import skimage.data

    left = skimage.data.stereo_motorcycle()[0]
    assert left.shape == (500, 741, 3)
    [pair] = data.validation_images(config(3))
    np.testing.assert_array_equal(pair.hr, left[130: 370, 210: 528])


def test_image_lists_differ_for_files_of_the_same_names_and_other_sizes(tmp_path):
    """Two hosts whose folders hold files of the same names but other images (another copy of the data set) make
    different global batches: their ImageLists, which the trainer compares, differ; a copy in another folder is
    the same list."""
    for folder, shape in (("a", (40, 48)), ("b", (48, 40)), ("c", (40, 48))):
        for i in range(2):
            write_image(tmp_path / folder / f"{i}.png", smooth_image(*shape, i))
    lists = {f: data.ImageList.of(data.training_pairs(config(2, source="folder", hr_dirs=str(tmp_path / f),
                                                                patch_size=8, cache_dir=str(tmp_path / "c"))))
             for f in "abc"}
    assert lists["a"].count == 2 and lists["a"] == lists["c"] != lists["b"]


def test_setting_the_state_of_an_iterator_already_read_goes_back_to_that_batch(div2k_folder, tmp_path):
    """set_state on an iterator that has made batches (or started reading ahead) restarts at the batch it names,
    as a fresh one set to it does: not where the old read-ahead had got to."""
    root, _ = div2k_folder
    cfg = config(2, source="folder", hr_dirs=str(root / "HR"), lr_dirs=str(root / "LR"), patch_size=8,
                 cache_dir=str(tmp_path / "cache"))
    it = data.train_iterator(cfg, global_batch_size=4, seed=2, process_index=0, process_count=1)
    first = take(it, 5)
    it.set_state({"next_batch": 1})
    assert_batches_equal(take(it, 2), first[1:3])
    assert it.get_state() == {"next_batch": 3}
    it.start_prefetch()
    it.set_state({"next_batch": 0})
    assert_batches_equal(take(it, 5), first)
    it.close()


def test_config_values_of_another_type_are_one_line_and_none_in_a_text_key_is_unset():
    """DataConfig.from_config given a dict (or a ConfigDict, which takes None for any key): bool() read augment="False"
    as True and augment=None as False, int() cut patch_size=48.5 to 48, and tfds_split=None became the split "None";
    each is now refused in one line naming the key, as a ConfigDict refuses a value of another type. None in a key
    whose unset value is "" is that "" (as configs.check_nones reads an experiment file): cache_dir=None was a
    TypeError traceback."""
    for given, message in (({"augment": "False"}, "data.augment must be a bool (True or False) (default True); got "
                            "'False'"),
                           ({"augment": None}, "data.augment must be a bool (True or False) (default True); got None"),
                           ({"patch_size": 48.5}, "data.patch_size must be an int (default 48); got 48.5"),
                           ({"val_max_images": None}, "data.val_max_images must be an int (default 10); got None"),
                           ({"tfds_split": None}, "data.tfds_split must be a str (default 'train'); got None")):
        with pytest.raises(ValueError) as e:
            data.DataConfig.from_config({"val_source": "demo", **given}, scale=2)
        assert str(e.value) == message
    import ml_collections

    cd = data.default_config()
    cd.augment = None  # a ConfigDict takes None for any key
    with pytest.raises(ValueError, match=r"^data.augment must be a bool"):
        data.DataConfig.from_config(cd, scale=2)
    cfg = config(2, augment=np.bool_(False), patch_size=np.int64(32), cache_dir=None, tfds_data_dir=None)
    assert (cfg.augment, cfg.patch_size, cfg.tfds_data_dir) == (False, 32, None)
    assert type(cfg.augment) is bool and type(cfg.patch_size) is int
    unset = data.DataConfig.from_config(ml_collections.ConfigDict({"val_source": "demo"}), scale=2)
    assert cfg.cache_dir == unset.cache_dir
    assert config(2, source="folder", hr_dirs="a", val_source="folder", val_dir="b", val_lr_dir=None).val_lr_dir == ""


def test_a_cache_entry_made_before_exif_orientations_were_lined_up_is_not_served(tmp_path):
    """A pair whose HR photo has an EXIF orientation its LR file lacks was cached misaligned by versions before
    they were lined up, under the key of its two files: such an entry is not used (the key holds the tags)."""
    from PIL import Image

    stored = smooth_image(48, 48, 0)
    exif = Image.Exif()
    exif[0x0112] = 3  # turned 180 degrees
    (tmp_path / "HR").mkdir()
    Image.fromarray(stored).save(tmp_path / "HR" / "a.png", exif=exif.tobytes())
    write_image(tmp_path / "LR" / "X2" / "ax2.png", degrade.bicubic_lr(stored, 2))  # from the stored pixels, no tag
    hr_path, lr_path = str(tmp_path / "HR" / "a.png"), str(tmp_path / "LR" / "X2" / "ax2.png")
    upright = stored[::-1, ::-1]
    old_key = sources.digest(sources._file_id(hr_path), sources._file_id(lr_path))
    old = sources._entry_paths(sources.PairSpec(hr_path, old_key, lambda: None), 2, str(tmp_path / "cache"))
    os.makedirs(tmp_path / "cache")
    np.save(old[0], upright)  # what those versions cached: the HR turned upright, its LR not
    np.save(old[1], degrade.bicubic_lr(stored, 2))
    cfg = config(2, source="folder", hr_dirs=str(tmp_path / "HR"), lr_dirs=str(tmp_path / "LR"), patch_size=8,
                 cache_dir=str(tmp_path / "cache"))
    pair = data.training_pairs(cfg)[0]
    np.testing.assert_array_equal(np.asarray(pair["hr"]), upright)
    np.testing.assert_array_equal(np.asarray(pair["lr"]), degrade.bicubic_lr(stored, 2)[::-1, ::-1])


def test_an_lr_file_one_pixel_larger_than_hr_over_the_scale_is_skipped_by_name(tmp_path, caplog):
    """An LR file of ceil(HR / scale) pixels (MATLAB's imresize of an HR image that is not a multiple of the scale)
    does not line up with any HR crop: that pair is skipped, naming both sizes, and the others are used."""
    for n, (h, w) in ((1, (66, 98)), (2, (64, 96))):
        hr = smooth_image(h, w, n)
        write_image(tmp_path / "HR" / f"{n:04d}.png", hr)
        write_image(tmp_path / "LR" / "X4" / f"{n:04d}x4.png", degrade.imresize(hr, 0.25))
    assert degrade.imresize(smooth_image(66, 98, 1), 0.25).shape == (17, 25, 3)
    cfg = config(4, source="folder", hr_dirs=str(tmp_path / "HR"), lr_dirs=str(tmp_path / "LR"), patch_size=4,
                 cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="rnan_jax.sources"):
        pairs = data.training_pairs(cfg)
    assert [os.path.basename(n) for n in pairs.names] == ["0002.png"]
    assert (f"{tmp_path / 'HR' / '0001.png'}: LR image is 25x17 but the HR image is 98x66 (expected 24x16 at x4)"
            in caplog.text)


def test_a_demo_image_whose_lr_side_is_exactly_the_patch_is_used():
    """chelsea (451x300) at x2 is 225x150: a 150-pixel patch takes it, a 151-pixel one leaves it out."""
    names = [data.training_pairs(config(2, source="demo", patch_size=p)).names for p in (150, 151)]
    assert "chelsea" in names[0] and "chelsea" not in names[1] and len(names[0]) == len(names[1]) + 1 == 6


def test_a_tfds_validation_example_too_small_to_score_is_skipped_by_name(tmp_path, caplog):
    """A 12x12 HR example at x4 leaves 4x4 pixels once 4 are shaved from each border, less than an SSIM window:
    it is skipped with a warning naming it, and does not count towards val_max_images."""
    tiny = coordinate_image(12, 12, 1)
    big = coordinate_image(64, 96, 2)
    examples = [{"hr": tiny, "lr": tiny[::4, ::4].copy()}, {"hr": big, "lr": big[::4, ::4].copy()}]
    cfg = config(4, source="demo", tfds_data_dir=str(tmp_path / "tfds"), val_source="tfds", val_max_images=1)
    with mock_data(as_data_source_fn=lambda builder, split, **kw: examples), caplog.at_level(logging.WARNING):
        val = data.validation_images(cfg)
    assert [(p.name, p.hr.shape) for p in val] == [("div2k/bicubic_x4:validation[1]", (64, 96, 3))]
    assert "skipping div2k/bicubic_x4:validation[0]: image is 12x12, too small to score at x4" in caplog.text
