"""MiniImagenet: both layouts, ordering, resize, cache, errors, the real split files, presets, and learning."""

from __future__ import annotations

import csv
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from miniimagenet_fixture import (
    IMAGES,
    SPLITS,
    FixtureImage,
    image_pixels,
    make_csv_layout,
    make_pickle_layout,
    manifest,
    oracle_image,
    read_code,
    shared_miniimagenet_splits,
    write_image,
    write_pickle,
    write_split_csv,
)
from PIL import Image

from fastmaml.config import TaskConfig, load_config
from fastmaml.evaluate import evaluate_run
from fastmaml.experiment import build_model, build_tasks
from fastmaml.models import ConvNet
from fastmaml.tasks import miniimagenet
from fastmaml.tasks.miniimagenet import (
    MiniImagenetDataError,
    MiniImagenetNotFoundError,
    build_miniimagenet_tasks,
    find_miniimagenet,
    load_miniimagenet,
    miniimagenet_classes,
    read_split_csv,
)
from fastmaml.train import train

PRESETS = ["miniimagenet_5way1shot", "miniimagenet_5way5shot", "miniimagenet_5way1shot_fo", "miniimagenet_5way5shot_fo"]
MANIFEST = manifest()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both layouts of the same images, written once per module: never modify these (copy first)."""
    base = tmp_path_factory.mktemp("miniimagenet")
    csv_root = make_csv_layout(base / "csv", MANIFEST)
    pickle_root = make_pickle_layout(base / "pickle", csv_root / "images", MANIFEST)
    return {"csv": csv_root, "pickle": pickle_root}


@pytest.fixture
def csv_root(pristine, tmp_path) -> Path:
    """A private copy of the csv layout (``copytree`` keeps the files' sizes and mtimes)."""
    return Path(shutil.copytree(pristine["csv"], tmp_path / "csv"))


@pytest.fixture
def pickle_root(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine["pickle"], tmp_path / "pickle"))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def codes(store: torch.Tensor) -> list[list[int]]:
    return [[read_code(image.numpy()) for image in cls] for cls in store]


def expected_codes(split: str) -> list[list[int]]:
    """Fixture codes in the documented order: classes by label, images by file name."""
    entries = MANIFEST[split]
    labels = sorted({entry.label for entry in entries})
    return [[e.code for e in sorted((e for e in entries if e.label == label), key=lambda e: e.filename)]
            for label in labels]


def count_decodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = miniimagenet.decode_miniimagenet

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(miniimagenet, "decode_miniimagenet", spy)
    return calls


# --- decoding and order -----------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS, ids=[f"split={s}" for s in SPLITS])
def test_csv_layout_finds_every_image_in_sorted_order(pristine, cache, split):
    store = load_miniimagenet(pristine["csv"], split, cache)
    classes = len(expected_codes(split))
    assert store.shape == (classes, IMAGES, 3, 84, 84) and store.dtype == torch.uint8
    assert codes(store) == expected_codes(split)  # every file once, classes by wnid, images by name
    labels = sorted({e.label for e in MANIFEST[split]})
    assert miniimagenet_classes(pristine["csv"], split) == labels


def test_resize_and_rgb_conversion_match_the_pillow_oracle(pristine, cache):
    store = load_miniimagenet(pristine["csv"], "train", cache)
    entries = {(c, e): image for c, cls in enumerate(expected_codes("train")) for e, _ in enumerate(cls)
               for image in MANIFEST["train"] if image.code == cls[e]}
    modes = {image.mode for image in entries.values()}
    sizes = {image.size for image in entries.values()}
    assert {"RGB", "L", "CMYK", "PNG"} <= modes and (84, 84) in sizes and len(sizes) > 2
    for (c, e), image in entries.items():
        oracle = oracle_image(pristine["csv"] / "images" / image.filename)
        assert np.array_equal(store[c, e].permute(1, 2, 0).numpy(), oracle), image
        if image.mode == "RGB":  # channels are R, G, B: the class colour sits in green and blue
            green, blue = store[c, e, 1].double().mean().item(), store[c, e, 2].double().mean().item()
            assert abs(green - image.colour[0]) < 6 and abs(blue - image.colour[1]) < 6, image
    (c, e), same = next((k, v) for k, v in entries.items() if v.size == (84, 84) and v.mode == "RGB")
    with Image.open(pristine["csv"] / "images" / same.filename) as raw:  # 84x84 files are kept as decoded
        assert np.array_equal(store[c, e].permute(1, 2, 0).numpy(), np.asarray(raw.convert("RGB")))


@pytest.mark.parametrize("split", SPLITS, ids=[f"split={s}" for s in SPLITS])
def test_pickle_layout_gives_the_same_store(pristine, cache, split):
    from_pickle = load_miniimagenet(pristine["pickle"], split, cache)
    from_csv = load_miniimagenet(pristine["csv"], split, cache)
    assert torch.equal(from_pickle, from_csv)
    assert miniimagenet_classes(pristine["pickle"], split) == miniimagenet_classes(pristine["csv"], split)
    assert len(list(cache.glob(f"miniimagenet-{split}-84px-lanczos-*.npy"))) == 2


def test_splits_hold_disjoint_classes_and_images(pristine, cache):
    seen_codes, seen_labels = {}, {}
    for split in SPLITS:
        store = load_miniimagenet(pristine["csv"], split, cache)
        seen_codes[split] = {code for cls in codes(store) for code in cls}
        assert seen_codes[split] == {e.code for e in MANIFEST[split]}
        seen_labels[split] = set(miniimagenet_classes(pristine["csv"], split))
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not seen_codes[a] & seen_codes[b] and not seen_labels[a] & seen_labels[b]


@pytest.mark.parametrize("in_splits_folder", [True, False], ids=["csv-in-splits/", "csv-beside-images/"])
def test_root_may_be_the_data_or_its_parent(tmp_path, cache, in_splits_folder):
    images = {"test": MANIFEST["test"]}
    make_csv_layout(tmp_path / "parent" / "miniimagenet", images, in_splits_folder=in_splits_folder)
    source = find_miniimagenet(tmp_path / "parent", "test")
    folder = tmp_path / "parent" / "miniimagenet"
    assert source.layout == "csv" and source.images == folder / "images"
    assert source.path == (folder / "splits" / "test.csv" if in_splits_folder else folder / "test.csv")
    assert codes(load_miniimagenet(tmp_path / "parent", "test", cache)) == expected_codes("test")


def test_both_layouts_present_uses_csv_unless_told(pristine, tmp_path, cache):
    root = Path(shutil.copytree(pristine["csv"], tmp_path / "both"))
    shutil.copy(pristine["pickle"] / "mini-imagenet-cache-val.pkl", root)
    assert find_miniimagenet(root, "val").layout == "csv"
    assert find_miniimagenet(root, "val", layout="pickle").layout == "pickle"
    store = load_miniimagenet(root, "val", cache, layout="pickle")
    assert [p.name.split("-")[4] for p in cache.iterdir()] == ["pickle"]
    assert torch.equal(store, load_miniimagenet(root, "val", cache))
    with pytest.raises(ValueError, match="layout must be one of auto, csv, pickle"):
        find_miniimagenet(root, "val", layout="zip")


def test_data_root_and_cache_dir_default_from_environment(pristine, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMAML_DATA", str(pristine["pickle"]))
    monkeypatch.setenv("FASTMAML_CACHE", str(tmp_path / "env-cache"))
    load_miniimagenet(split="val")
    assert len(list((tmp_path / "env-cache").glob("miniimagenet-val-*.npy"))) == 1


# --- cache ------------------------------------------------------------------------------------


def test_second_load_hits_the_cache(csv_root, cache, monkeypatch):
    calls = count_decodes(monkeypatch)
    first = load_miniimagenet(csv_root, "train", cache)
    start = time.perf_counter()
    second = load_miniimagenet(csv_root, "train", cache)
    assert time.perf_counter() - start < 1.0
    assert len(calls) == 1 and torch.equal(first, second)
    assert [p.suffix for p in cache.iterdir()] == [".npy"]  # no temp file left behind


def test_cache_is_invalidated_when_the_split_file_changes(csv_root, cache, monkeypatch):
    calls = count_decodes(monkeypatch)
    first = load_miniimagenet(csv_root, "train", cache)
    path = csv_root / "splits" / "train.csv"
    with open(path, newline="") as f:
        rows = [tuple(row) for row in list(csv.reader(f))[1:]]
    dropped = sorted({label for _, label in rows})[0]
    write_split_csv(path, [row for row in rows if row[1] != dropped])
    second = load_miniimagenet(csv_root, "train", cache)
    assert len(calls) == 2 and torch.equal(second, first[1:])
    assert len(list(cache.glob("*.npy"))) == 2


def test_cache_is_invalidated_when_an_image_changes(csv_root, cache, monkeypatch):
    calls = count_decodes(monkeypatch)
    first = load_miniimagenet(csv_root, "val", cache)
    image = next(e for e in MANIFEST["val"] if e.mode == "RGB")
    path = csv_root / "images" / image.filename
    before = path.stat()
    write_image(path, image, code=999)
    # a rewrite within one clock tick can keep the mtime; move it on so the test does not depend on timing
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    second = load_miniimagenet(csv_root, "val", cache)
    assert len(calls) == 2
    changed = [(c, e) for c, cls in enumerate(codes(second)) for e, code in enumerate(cls) if code == 999]
    assert len(changed) == 1 and read_code(first[changed[0]].numpy()) == image.code
    assert int((first != second).reshape(-1, 3 * 84 * 84).any(1).sum()) == 1


def test_cache_is_invalidated_when_the_pickle_changes(pickle_root, cache, monkeypatch):
    calls = count_decodes(monkeypatch)
    first = load_miniimagenet(pickle_root, "test", cache)
    path = pickle_root / "mini-imagenet-cache-test.pkl"
    before = path.stat()
    with open(path, "rb") as f:
        data = pickle.load(f)
    data["image_data"] = 255 - data["image_data"]
    write_pickle(path, data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    assert torch.equal(load_miniimagenet(pickle_root, "test", cache), 255 - first) and len(calls) == 2


def test_unreadable_cache_is_rebuilt(csv_root, cache, monkeypatch):
    first = load_miniimagenet(csv_root, "test", cache)
    (path,) = cache.glob("*.npy")
    path.write_bytes(path.read_bytes()[:100])
    calls = count_decodes(monkeypatch)
    assert torch.equal(load_miniimagenet(csv_root, "test", cache), first) and len(calls) == 1


# --- errors -----------------------------------------------------------------------------------

BOTH_LAYOUTS = r"\(a\) csv: DIR/images/.*train.csv, val.csv, test.csv.*\(b\) pickle: DIR/mini-imagenet-cache-train.pkl"


def test_no_root_and_no_environment_variable_describes_both_layouts(cache, monkeypatch):
    monkeypatch.delenv("FASTMAML_DATA", raising=False)
    with pytest.raises(MiniImagenetNotFoundError, match=f"no data folder given.*{BOTH_LAYOUTS}.*FASTMAML_DATA"):
        load_miniimagenet(None, "train", cache)


def test_empty_root_names_the_files_it_looked_for(tmp_path, cache):
    with pytest.raises(MiniImagenetNotFoundError, match=BOTH_LAYOUTS) as info:
        load_miniimagenet(tmp_path, "val", cache)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "images/ + val.csv or mini-imagenet-cache-val.pkl" in message and str(tmp_path / "miniimagenet") in message


def test_split_file_without_images_folder_names_the_folder(csv_root, cache):
    shutil.rmtree(csv_root / "images")
    with pytest.raises(MiniImagenetNotFoundError, match=f"found .*train.csv but no images/ folder {csv_root}/images"):
        load_miniimagenet(csv_root, "train", cache)


def test_images_folder_without_split_file_names_the_file(csv_root, cache):
    (csv_root / "splits" / "test.csv").unlink()
    with pytest.raises(MiniImagenetNotFoundError, match=f"found {csv_root}/images but no test.csv in {csv_root}"):
        load_miniimagenet(csv_root, "test", cache)


def test_missing_image_names_the_file_before_decoding(csv_root, cache, monkeypatch):
    monkeypatch.setattr(miniimagenet, "_decode_image", lambda *a: pytest.fail("decoded with an image missing"))
    gone = MANIFEST["val"][7].filename
    (csv_root / "images" / gone).unlink()
    with pytest.raises(MiniImagenetNotFoundError, match=f"1 of the 100 images listed in .*val.csv are missing "
                                                         f"from .*images: {gone}.*{BOTH_LAYOUTS}"):
        load_miniimagenet(csv_root, "val", cache)


def test_class_with_a_different_image_count_is_named(csv_root, pickle_root, cache):
    path = csv_root / "splits" / "test.csv"
    with open(path, newline="") as f:
        rows = [tuple(row) for row in list(csv.reader(f))[1:]]
    short = sorted({label for _, label in rows})[2]
    victim = next(row for row in rows if row[1] == short)
    write_split_csv(path, [row for row in rows if row != victim])
    with pytest.raises(MiniImagenetDataError, match=f"class {short} has 19 images, but the other classes have 20"):
        load_miniimagenet(csv_root, "test", cache)

    pkl = pickle_root / "mini-imagenet-cache-test.pkl"
    with open(pkl, "rb") as f:
        data = pickle.load(f)
    data["class_dict"][short] = data["class_dict"][short][:-2]
    write_pickle(pkl, data)
    with pytest.raises(MiniImagenetDataError, match=f"class {short} has 18 images, but the other classes have 20"):
        load_miniimagenet(pickle_root, "test", cache)


@pytest.mark.parametrize("key", ["image_data", "class_dict"], ids=lambda k: f"missing={k}")
def test_pickle_without_a_key_names_it(pickle_root, cache, key):
    path = pickle_root / "mini-imagenet-cache-train.pkl"
    write_pickle(path, {"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"a": [0], "b": [1]}, "x": 1})
    with open(path, "rb") as f:
        data = pickle.load(f)
    del data[key]
    write_pickle(path, data)
    with pytest.raises(MiniImagenetDataError, match=f"{path} has no '{key}' key.*{BOTH_LAYOUTS}"):
        load_miniimagenet(pickle_root, "train", cache)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"image_data": np.zeros((2, 84, 84, 3), np.float32), "class_dict": {"a": [0]}},
         r"'image_data' must be a uint8 array \[n, 84, 84, 3\], got float32 \(2, 84, 84, 3\)"),
        ({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"a": [0], "b": [2]}},
         r"class b lists indices outside image_data \(0..1\)"),
        ({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"a": [0], "b": [0]}},
         "class b lists an image that is listed twice"),
        ([1, 2], "holds a list, expected a dict with 'image_data' and 'class_dict'"),
    ],
    ids=["float-images", "index-out-of-range", "shared-image", "not-a-dict"],
)
def test_malformed_pickle_is_a_clear_error(pickle_root, cache, content, message):
    write_pickle(pickle_root / "mini-imagenet-cache-val.pkl", content)
    with pytest.raises(MiniImagenetDataError, match=message):
        load_miniimagenet(pickle_root, "val", cache)


def test_pickle_images_of_another_size_are_resized_like_jpegs(pickle_root, cache):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 90, 100, 3), dtype=np.uint8)
    write_pickle(pickle_root / "mini-imagenet-cache-val.pkl",
                 {"image_data": images, "class_dict": {"b": [3, 0], "a": [1, 2]}})
    store = load_miniimagenet(pickle_root, "val", cache)
    assert store.shape == (2, 2, 3, 84, 84)
    for (c, e), i in {(0, 0): 1, (0, 1): 2, (1, 0): 3, (1, 1): 0}.items():  # classes sorted, class_dict order kept
        oracle = np.asarray(Image.fromarray(images[i]).resize((84, 84), resample=Image.Resampling.LANCZOS))
        assert np.array_equal(store[c, e].permute(1, 2, 0).numpy(), oracle)


def test_truncated_pickle_is_a_clear_error(pickle_root, cache):
    path = pickle_root / "mini-imagenet-cache-val.pkl"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(MiniImagenetDataError, match="is not a readable pickle .*truncated or corrupt"):
        load_miniimagenet(pickle_root, "val", cache)


def test_undecodable_image_names_the_file(csv_root, cache):
    broken = MANIFEST["train"][11].filename
    (csv_root / "images" / broken).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    with pytest.raises(MiniImagenetDataError, match=f"images/{broken} is not a decodable image"):
        load_miniimagenet(csv_root, "train", cache)
    assert not cache.exists() or not list(cache.iterdir())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,class\na.jpg,n1\n", "must start with the header line 'filename,label'"),
        ("filename,label\na.jpg\n", "row 2: expected 'filename,label', found 'a.jpg'"),
        ("filename,label\na.jpg,n1\na.jpg,n1\n", "row 3: a.jpg is listed twice"),
        ("filename,label\n", "lists no images"),
    ],
    ids=["bad-header", "short-row", "duplicate", "empty"],
)
def test_malformed_split_file_is_a_clear_error(tmp_path, text, message):
    (tmp_path / "val.csv").write_text(text)
    with pytest.raises(MiniImagenetDataError, match=f"{tmp_path}/val.csv.*{message}"):
        read_split_csv(tmp_path / "val.csv")


def test_unknown_split_and_unwritable_cache(csv_root, tmp_path):
    with pytest.raises(ValueError, match="split must be one of train, val, test; got 'valid'"):
        load_miniimagenet(csv_root, "valid")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OSError, match="cannot write the MiniImagenet cache .* point FASTMAML_CACHE"):
        load_miniimagenet(csv_root, "test", tmp_path / "a-file" / "cache")


# --- the real split files (skipped where the shared data folder is absent) --------------------

REAL = shared_miniimagenet_splits()
needs_real = pytest.mark.skipif(REAL is None, reason="real MiniImagenet split files not found (set FASTMAML_DATA)")


@needs_real
def test_real_split_files_have_64_16_20_classes_of_600_disjoint():
    splits = {split: read_split_csv(REAL / f"{split}.csv") for split in SPLITS}
    assert {split: len(classes) for split, classes in splits.items()} == miniimagenet.SPLIT_CLASSES
    for classes in splits.values():
        assert {len(names) for names in classes.values()} == {600}
        assert all(name.startswith(label) and name.endswith(".jpg") for label, names in classes.items()
                   for name in names)
    labels = [set(classes) for classes in splits.values()]
    files = [{name for names in classes.values() for name in names} for classes in splits.values()]
    assert len(set.union(*labels)) == 100 and len(set.union(*files)) == 60_000
    with open(REAL / "train.csv", newline="") as f:  # the store order is the file's own order
        rows = list(csv.reader(f))[1:]
    assert [name for names in splits["train"].values() for name in names] == [name for name, _ in rows]


@needs_real
def test_real_split_files_without_images_name_the_missing_ones(tmp_path, cache):
    (tmp_path / "images").mkdir()
    (tmp_path / "splits").symlink_to(REAL, target_is_directory=True)
    with pytest.raises(MiniImagenetNotFoundError,
                       match="38400 of the 38400 images listed in .*train.csv are missing .*n0153282900000005.jpg"):
        load_miniimagenet(tmp_path, "train", cache)


# --- configs and task sources -----------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS, ids=[f"preset={p}" for p in PRESETS])
def test_presets_are_the_papers_setting(preset):
    config = load_config(preset)
    shots = 5 if "5shot" in preset else 1
    task = config.task
    assert (task.name, task.ways, task.shots, task.queries, task.rotation) == ("miniimagenet", 5, shots, 15, "none")
    assert (config.meta.inner_lr, config.meta.reduction, config.meta.inner_steps) == (0.01, "sum_over_classes", 5)
    assert config.meta.first_order is preset.endswith("_fo")
    assert (config.train.meta_batch, config.train.iterations, config.train.val_every) == (
        {1: 4, 5: 2}[shots], 60000, 1000)
    assert config.train.grad_clip == 0 and config.train.outer_lr == 0.001
    assert (config.eval.tasks, config.eval.steps, config.eval.shots, config.eval.queries) == (600, 10, [shots], 15)
    model = build_model(config)
    assert isinstance(model, ConvNet) and model.pool
    # the paper's net: 3->32->32->32->32 3x3 convs, 4 batch norms, linear from 5*5*32 to 5 classes
    assert sum(p.numel() for p in model.parameters()) == (3 * 9 + 1) * 32 + 3 * (32 * 9 + 1) * 32 + 4 * 64 + 801 * 5
    assert model(torch.zeros(2, 3, 84, 84)).shape == (2, 5)


def test_omniglot_model_is_unchanged():
    model = build_model(load_config("omniglot_5way1shot"))
    assert isinstance(model, ConvNet) and not model.pool
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 5)


def test_build_tasks_samples_5way_episodes_from_the_split(pristine, cache):
    config = load_config("miniimagenet_5way1shot", [f"task.data_root={pristine['csv']}", f"task.cache_dir={cache}",
                                                    "task.rotation=per_task"])  # rotation is ignored
    tasks = build_tasks(config, "train", torch.device("cpu"))
    episode = tasks.sample(config.train.meta_batch, torch.Generator().manual_seed(0))
    assert episode.shapes() == {"support_x": (4, 5, 3, 84, 84), "support_y": (4, 5),
                                "query_x": (4, 75, 3, 84, 84), "query_y": (4, 75)}
    assert episode.support_x.dtype == torch.float32 and tasks.rotation == "none"
    train_codes = {e.code: e.label for e in MANIFEST["train"]}
    for t in range(4):
        images = torch.cat([episode.support_x[t], episode.query_x[t]])
        labels = torch.cat([episode.support_y[t], episode.query_y[t]]).tolist()
        found = [read_code(image.numpy()) for image in images]
        assert len(set(found)) == 80 and set(found) <= set(train_codes)  # upright, unique, from meta-train
        for label in range(5):  # one class per label, and every label a different class
            assert len({train_codes[code] for code, y in zip(found, labels) if y == label}) == 1
        assert len({train_codes[code] for code in found}) == 5
    test = build_tasks(config, "test", torch.device("cpu"), shots=5, queries=3)
    assert test.num_classes == 5 and (test.shots, test.queries) == (5, 3)


def test_build_miniimagenet_tasks_limits_only_meta_train_classes(pristine, cache):
    config = TaskConfig(name="miniimagenet", ways=2, data_root=str(pristine["pickle"]), cache_dir=str(cache),
                        max_classes=3)
    assert build_miniimagenet_tasks(config, "train", shots=1, queries=1, device="cpu").classes.tolist() == [0, 1, 2]
    assert build_miniimagenet_tasks(config, "val", shots=1, queries=1, device="cpu").num_classes == 5


# --- learning ---------------------------------------------------------------------------------


def test_5way_1shot_learns_above_chance_on_the_fixture(pristine, tmp_path, cache):
    """40 meta-iterations on 6 colour-coded classes, tested on 5 unseen ones (about 20 s on one busy core).

    84x84 images make every step costly on a CPU, so the run is short and the step sizes larger
    than the paper's (inner 0.02 on the summed loss, i.e. 0.1 on the mean; outer 0.003) to learn
    within it.
    """
    config = load_config("miniimagenet_5way1shot", [
        f"task.data_root={pristine['csv']}", f"task.cache_dir={cache}", "task.queries=3", "model.filters=8",
        "meta.inner_steps=1", "meta.inner_lr=0.02", "train.outer_lr=0.003", "train.meta_batch=2",
        "train.iterations=40", "train.val_every=0", "train.log_every=20", "train.checkpoint_every=40",
        "eval.tasks=40", "eval.steps=1", "eval.queries=3", "eval.batch=20",
    ])
    train(config, tmp_path / "run", progress=False)
    accuracy = evaluate_run(tmp_path / "run", "last")["by_shots"]["1"]["accuracy"]["mean"]
    # chance is 0.2 (labels are permuted per task, so 0 steps stays near it); 0.70 after 1 step measured
    assert accuracy[1] > 0.4 and accuracy[1] > accuracy[0] + 0.15, accuracy


def test_fixture_images_are_what_the_docstring_says():
    entry = FixtureImage("train", "n1", "n1.jpg", 0b101, (30, 210), (100, 90), "RGB")
    pixels = image_pixels(entry)
    assert pixels.shape == (90, 100, 3) and read_code(pixels.transpose(2, 0, 1)) == 5
