"""CIFAR-FS and FC100: the shipped splits, decoding the CIFAR-100 archive, the cache, safety, errors, presets.

The fixture is a small archive in the official format: ``cifar-100-python.tar.gz`` holding
``cifar-100-python/{train,test,meta}``, written as Python 2's cPickle wrote them (bytes as
``str`` opcodes, numpy arrays through ``numpy.core.multiarray._reconstruct``), with CIFAR-100's
real 100 fine and 20 coarse names, 5 + 1 images per class (train + test), stored shuffled. Every
pixel says where it belongs: red = fine label, green = the image's position within its class in
the store (train images in file order, then test), blue = a pattern over rows and columns.
"""

from __future__ import annotations

import doctest
import io
import os
import pickle
import random
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmaml.config import TaskConfig, from_dict, read_yaml
from fastmaml.models import ConvNet
from fastmaml.tasks import cifar
from fastmaml.tasks.cifar import (
    COARSE_LABELS,
    FINE_LABELS,
    CifarDataError,
    CifarNotFoundError,
    build_cifar_tasks,
    class_ids,
    find_cifar100,
    load_cifar100,
    read_pickle,
    read_splits,
)

TRAIN_PER_CLASS, TEST_PER_CLASS = 5, 1
PER_CLASS = TRAIN_PER_CLASS + TEST_PER_CLASS
ROWS, COLS = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
PATTERN = ((ROWS * 7 + COLS * 3) % 256).astype(np.uint8)
"""The blue plane of every image: any flip, transpose or plane mix-up changes it."""
PRESETS = ["cifar_fs_5way1shot", "cifar_fs_5way5shot", "fc100_5way1shot", "fc100_5way5shot"]
SUPERCLASS = {  # CIFAR-100's grouping, from its web page (https://www.cs.toronto.edu/~kriz/cifar.html)
    "aquatic_mammals": "beaver dolphin otter seal whale",
    "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip",
    "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman",
    "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train",
    "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}
COARSE_OF = {fine: coarse for coarse, names in SUPERCLASS.items() for fine in names.split()}


# --- the fixture: the official format, small ---------------------------------------------------


class Python2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` opcodes, as the cPickle that wrote the official files did."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_str


def python2_pickle(value: object) -> bytes:
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(value)
    data = buffer.getvalue()
    new, old = b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy._core.multiarray\n_reconstruct\n"
    return data.replace(old, new) if old in data else data


def make_batches(seed: int = 0, shift: int = 0) -> dict[str, dict[bytes, object]]:
    """The ``train`` and ``test`` dicts, images shuffled; ``shift`` changes every pixel (another archive)."""
    rng = random.Random(seed)
    batches = {}
    for name, count, offset in (("train", TRAIN_PER_CLASS, 0), ("test", TEST_PER_CLASS, TRAIN_PER_CLASS)):
        items = [(c, i) for c in range(100) for i in range(count)]
        rng.shuffle(items)
        # position within the class = order of appearance in this file (+ the train images before it)
        seen = [0] * 100
        images, fine = [], []
        for c, _ in items:
            image = np.empty((3, 32, 32), dtype=np.uint8)
            image[0], image[1], image[2] = c, offset + seen[c] + shift, PATTERN
            seen[c] += 1
            images.append(image.reshape(-1))
            fine.append(c)
        batches[name] = {
            b"filenames": [f"img_{name}_{k}.png".encode() for k in range(len(items))],
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [COARSE_LABELS.index(COARSE_OF[FINE_LABELS[c]]) for c in fine],
            b"data": np.stack(images),
        }
    return batches


def make_meta() -> dict[bytes, object]:
    return {
        b"fine_label_names": [name.encode() for name in FINE_LABELS],
        b"coarse_label_names": [name.encode() for name in COARSE_LABELS],
    }


def write_archive(path: Path, files: dict[str, bytes]) -> Path:
    """``path`` as the official tar.gz: a ``cifar-100-python/`` folder entry, then the files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        folder = tarfile.TarInfo("cifar-100-python")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def official_files(seed: int = 0, shift: int = 0) -> dict[str, bytes]:
    batches = make_batches(seed, shift)
    return {"train": python2_pickle(batches["train"]), "test": python2_pickle(batches["test"]),
            "meta": python2_pickle(make_meta())}


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The archive and the extracted folder of the same data, written once: copy before modifying."""
    base = tmp_path_factory.mktemp("cifar")
    files = official_files()
    archive = write_archive(base / "archive" / "cifar-100-python.tar.gz", files)
    folder = write_folder(base / "folder" / "cifar-100-python", files)
    return {"archive": archive.parent, "folder": folder.parent, "files": base}


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# --- the shipped splits -----------------------------------------------------------------------


def test_cifar100_names_are_the_official_label_order():
    # the archive's meta lists fine and coarse names alphabetically; labels index those lists
    assert FINE_LABELS == tuple(sorted(COARSE_OF)) and len(set(FINE_LABELS)) == 100
    assert COARSE_LABELS == tuple(sorted(SUPERCLASS)) and len(COARSE_LABELS) == 20


@pytest.mark.parametrize("name, counts", [("cifar_fs", (64, 16, 20)), ("fc100", (60, 20, 20))],
                         ids=["name=cifar_fs", "name=fc100"])
def test_splits_are_disjoint_cover_cifar100_and_have_the_published_sizes(name, counts):
    splits = read_splits(name)
    assert tuple(len(splits.classes[s]) for s in ("train", "val", "test")) == counts
    every = [name for s in ("train", "val", "test") for name in splits.classes[s]]
    assert len(every) == len(set(every)) == 100  # disjoint ...
    assert set(every) == set(FINE_LABELS)  # ... and covering every real fine label
    ids = class_ids(splits.classes["test"])
    assert [FINE_LABELS[i] for i in ids] == sorted(splits.classes["test"])


def test_fc100_splits_by_superclass_as_tadam():
    splits = read_splits("fc100")
    coarse_ids = {s: {COARSE_LABELS.index(name) for name in splits.superclasses[s]} for s in ("train", "val", "test")}
    # class_split in ElementAI/TADAM datasets/create_dataset_cifar100.py
    assert coarse_ids == {"train": {1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19}, "val": {8, 11, 13, 16},
                          "test": {0, 7, 12, 14}}
    for split, groups in splits.superclasses.items():
        for coarse, names in groups.items():
            assert sorted(names) == sorted(SUPERCLASS[coarse].split()), (split, coarse)


def test_cifar_fs_split_is_bertinettos():
    splits = read_splits("cifar_fs")
    # splits/bertinetto/val.txt and test.txt of the CIFAR-FS archive (bertinetto/r2d2)
    assert set(splits.classes["val"]) == set(
        "otter motorcycle television lamp crocodile shark butterfly beaver beetle tractor flatfish maple_tree "
        "camel crab sea cattle".split())
    assert set(splits.classes["test"]) == set(
        "baby bed bicycle chimpanzee fox leopard man pickup_truck plain poppy rocket rose snail sweet_pepper "
        "table telephone wardrobe whale woman worm".split())
    assert splits.superclasses == {}


def test_module_examples_run():
    result = doctest.testmod(cifar, verbose=False)
    assert result.failed == 0 and result.attempted >= 3


def test_unknown_benchmark_is_refused():
    with pytest.raises(ValueError, match="cifar_fs, fc100"):
        read_splits("cifar10")


# --- decoding ---------------------------------------------------------------------------------


def check_store(store: torch.Tensor) -> None:
    assert store.dtype == torch.uint8 and tuple(store.shape) == (100, PER_CLASS, 3, 32, 32)
    red, green, blue = store[:, :, 0], store[:, :, 1], store[:, :, 2]
    assert torch.equal(red, torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand_as(red))
    assert torch.equal(green, torch.arange(PER_CLASS, dtype=torch.uint8).view(1, -1, 1, 1).expand_as(green))
    assert torch.equal(blue, torch.from_numpy(PATTERN).expand_as(blue))


@pytest.mark.parametrize("layout", ["archive", "folder"], ids=["layout=archive", "layout=folder"])
def test_store_holds_every_image_by_fine_label_train_then_test(pristine, cache, layout):
    store = load_cifar100(pristine[layout], cache_dir=cache)
    check_store(store)


def test_fixture_pickles_are_in_the_python2_format(pristine):
    data = (pristine["folder"] / "cifar-100-python" / "train").read_bytes()
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data and b"_codecs" not in data
    with pytest.raises(UnicodeDecodeError):  # the reason the official files need encoding='bytes'
        pickle.loads(data, encoding="ascii")


def test_found_in_a_cifar100_subfolder_and_folder_preferred_to_archive(pristine, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(pristine["archive"], root / "cifar100")
    assert find_cifar100(root) == cifar.CifarSource("archive", root / "cifar100" / "cifar-100-python.tar.gz")
    shutil.copytree(pristine["folder"] / "cifar-100-python", root / "cifar100" / "cifar-100-python")
    assert find_cifar100(root) == cifar.CifarSource("folder", root / "cifar100" / "cifar-100-python")


def test_data_root_falls_back_to_fastmaml_data(pristine, cache, monkeypatch):
    monkeypatch.setenv("FASTMAML_DATA", str(pristine["archive"]))
    check_store(load_cifar100(None, cache_dir=cache))


# --- episodes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar_fs", "fc100"], ids=["name=cifar_fs", "name=fc100"])
@pytest.mark.parametrize("split", ["train", "val", "test"], ids=["split=train", "split=val", "split=test"])
def test_episodes_draw_only_the_splits_classes_with_consistent_labels(pristine, cache, name, split):
    task = TaskConfig(name=name, ways=5, data_root=str(pristine["archive"]), cache_dir=str(cache))
    sampler = build_cifar_tasks(task, split, shots=2, queries=3, device="cpu")
    names = set(read_splits(name).classes[split])
    assert sampler.image_shape == cifar.input_shape == (3, 32, 32) and sampler.num_classes == len(names)
    episode = sampler.sample(16, torch.Generator().manual_seed(1))
    assert tuple(episode.support_x.shape) == (16, 10, 3, 32, 32) and tuple(episode.query_x.shape) == (16, 15, 3, 32, 32)
    drawn = set()
    for t in range(16):
        classes = {}
        for x, y in ((episode.support_x[t], episode.support_y[t]), (episode.query_x[t], episode.query_y[t])):
            fine = (x[:, 0, 0, 0] * 255).round().long()  # red = fine label
            for label, c in zip(y.tolist(), fine.tolist()):
                assert classes.setdefault(label, c) == c  # one class per label, support and query alike
        assert sorted(classes) == list(range(5)) and len(set(classes.values())) == 5
        drawn |= {FINE_LABELS[c] for c in classes.values()}
        positions = (episode.support_x[t, :, 1, 0, 0] * 255).round().long().view(5, 2).tolist()
        queries = (episode.query_x[t, :, 1, 0, 0] * 255).round().long().view(5, 3).tolist()
        assert all(not set(s) & set(q) for s, q in zip(positions, queries))  # no image in both sides
    assert drawn <= names
    if name == "fc100":
        assert {COARSE_OF[name] for name in drawn} <= set(read_splits("fc100").superclasses[split])


def test_max_classes_limits_the_train_split_only(pristine, cache):
    task = TaskConfig(name="fc100", ways=5, data_root=str(pristine["archive"]), cache_dir=str(cache), max_classes=7)
    train = build_cifar_tasks(task, "train", shots=1, queries=1, device="cpu")
    test = build_cifar_tasks(task, "test", shots=1, queries=1, device="cpu")
    assert train.num_classes == 7 and test.num_classes == 20
    assert train.classes.tolist() == class_ids(read_splits("fc100").classes["train"])[:7].tolist()


def test_builder_refuses_other_task_names(pristine, cache):
    task = TaskConfig(name="miniimagenet", data_root=str(pristine["archive"]), cache_dir=str(cache))
    with pytest.raises(ValueError, match="cifar_fs, fc100"):
        build_cifar_tasks(task, "train", shots=1, queries=1, device="cpu")


# --- cache ------------------------------------------------------------------------------------


def test_decoded_once_then_read_from_the_cache_keyed_by_the_archive(pristine, cache, tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    shutil.copytree(pristine["archive"], root)
    check_store(load_cifar100(root, cache_dir=cache))
    assert capsys.readouterr().err.count("decoding CIFAR-100") == 1
    assert len(list(cache.glob("cifar100-*.npy"))) == 1

    def no_decode(source):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(cifar, "decode_cifar100", no_decode)
    check_store(load_cifar100(root, cache_dir=cache))
    assert capsys.readouterr().err == ""
    monkeypatch.undo()

    # a different archive under the same name gets its own cache entry
    write_archive(root / "cifar-100-python.tar.gz", official_files(seed=1, shift=10))
    store = load_cifar100(root, cache_dir=cache)
    assert capsys.readouterr().err.count("decoding CIFAR-100") == 1
    assert len(list(cache.glob("cifar100-*.npy"))) == 2
    assert torch.equal(store[:, :, 1, 0, 0], torch.arange(10, 10 + PER_CLASS, dtype=torch.uint8).expand(100, -1))


def test_a_broken_cache_file_is_rebuilt(pristine, cache, capsys):
    load_cifar100(pristine["folder"], cache_dir=cache)
    (entry,) = cache.glob("cifar100-*.npy")
    entry.write_bytes(b"not an npy file")
    capsys.readouterr()
    check_store(load_cifar100(pristine["folder"], cache_dir=cache))
    assert capsys.readouterr().err.count("decoding CIFAR-100") == 1


# --- safety -----------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": RunsCode(marker)}, protocol=4)
    assert pickle.loads(evil) == {b"data": 0} and marker.exists()  # the payload works with plain pickle
    marker.unlink()
    with pytest.raises(CifarDataError, match=r"refusing to load (posix|nt|os)\.system"):
        read_pickle(evil, "evil")
    assert not marker.exists()


def test_a_malicious_archive_fails_without_running_code(pristine, cache, tmp_path):
    marker = tmp_path / "pwned"
    files = official_files()
    files["meta"] = pickle.dumps({b"fine_label_names": RunsCode(marker)}, protocol=4)
    root = tmp_path / "data"
    write_archive(root / "cifar-100-python.tar.gz", files)
    with pytest.raises(CifarDataError, match="refusing to load"):
        load_cifar100(root, cache_dir=cache)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [4, 5], ids=["protocol=4", "protocol=5"])
def test_unpickler_reads_numpy_arrays_pickled_by_python_3(protocol):
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    value = read_pickle(pickle.dumps({b"data": array, b"fine_labels": [1, 2]}, protocol=protocol), "a pickle")
    assert np.array_equal(value[b"data"], array) and value[b"data"].dtype == np.uint8
    assert value[b"fine_labels"] == [1, 2]


def test_unpickler_refuses_python_3_bytes_through_codecs():
    # protocol 2 from Python 3 rebuilds bytes by calling _codecs.encode: not numpy, so refused
    with pytest.raises(CifarDataError, match=r"refusing to load _codecs\.encode"):
        read_pickle(pickle.dumps({b"data": b"x"}, protocol=2), "a pickle")


# --- errors -----------------------------------------------------------------------------------


def test_missing_archive_names_the_files_and_the_options(tmp_path, cache, monkeypatch):
    with pytest.raises(CifarNotFoundError) as error:
        load_cifar100(tmp_path, cache_dir=cache)
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    for part in ("cifar-100-python.tar.gz", "cifar-100-python/", "train, test, meta", str(tmp_path / "cifar100"),
                 "task.data_root=DIR", "FASTMAML_DATA=DIR"):
        assert part in message
    monkeypatch.delenv("FASTMAML_DATA", raising=False)
    with pytest.raises(CifarNotFoundError, match="no data folder given.*FASTMAML_DATA=DIR"):
        load_cifar100(None, cache_dir=cache)


def test_incomplete_folder_is_named(pristine, tmp_path, cache):
    root = tmp_path / "data"
    shutil.copytree(pristine["folder"], root)
    (root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(CifarNotFoundError, match="cifar-100-python lacks meta"):
        load_cifar100(root, cache_dir=cache)


def test_corrupt_archive(pristine, tmp_path, cache):
    root = tmp_path / "data"
    root.mkdir()
    data = (pristine["archive"] / "cifar-100-python.tar.gz").read_bytes()
    (root / "cifar-100-python.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CifarDataError, match="not a readable tar.gz archive.*download"):
        load_cifar100(root, cache_dir=cache)


def test_archive_without_the_pickles(tmp_path, cache):
    write_archive(tmp_path / "cifar-100-python.tar.gz", {"readme": b"hello"})
    with pytest.raises(CifarDataError, match="holds no cifar-100-python/train, cifar-100-python/test"):
        load_cifar100(tmp_path, cache_dir=cache)


def corrupted(tmp_path: Path, name: str, change) -> Path:
    """A folder layout whose ``name`` pickle went through ``change``."""
    batches = make_batches()
    files = {"train": batches["train"], "test": batches["test"], "meta": make_meta()}
    change(files[name])
    return write_folder(tmp_path / "data" / "cifar-100-python",
                        {key: python2_pickle(value) for key, value in files.items()}).parent


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("train", lambda d: d.update({b"data": d[b"data"][:, :1024]}), r"'data' must be a uint8 array \[n, 3072\]"),
        ("test", lambda d: d.update({b"data": d[b"data"].astype(np.float32)}), "'data' must be a uint8 array"),
        ("test", lambda d: d.pop(b"fine_labels"), "'fine_labels' must list one label per image"),
        ("train", lambda d: d[b"fine_labels"].__setitem__(0, 100), r"'fine_labels' holds labels outside 0..99"),
        ("meta", lambda d: d[b"fine_label_names"].reverse(), "fine_label_names is not CIFAR-100's"),
        ("meta", lambda d: d.pop(b"coarse_label_names"), "no coarse_label_names list"),
    ],
    ids=["wrong-width", "float-pixels", "no-labels", "label-out-of-range", "other-names", "no-coarse-names"],
)
def test_wrong_contents_are_named(tmp_path, cache, name, change, message):
    with pytest.raises(CifarDataError, match=message):
        load_cifar100(corrupted(tmp_path, name, change), cache_dir=cache)


def test_unequal_classes_are_named(tmp_path, cache):
    def drop_one(batch):
        keep = [i for i, c in enumerate(batch[b"fine_labels"]) if c != 3]
        keep += [i for i, c in enumerate(batch[b"fine_labels"]) if c == 3][1:]
        keep.sort()
        for key in (b"fine_labels", b"coarse_labels", b"filenames"):
            batch[key] = [batch[key][i] for i in keep]
        batch[b"data"] = batch[b"data"][keep]

    # one train image of class 3 (bear) is missing
    with pytest.raises(CifarDataError, match="bear has 5 images.*same number.*600 per class"):
        load_cifar100(corrupted(tmp_path, "train", drop_one), cache_dir=cache)


def test_a_class_in_the_wrong_superclass_is_named(tmp_path, cache):
    def move_whales(batch):
        whale = FINE_LABELS.index("whale")
        batch[b"coarse_labels"] = [COARSE_LABELS.index("fish") if f == whale else c
                                   for f, c in zip(batch[b"fine_labels"], batch[b"coarse_labels"])]

    with pytest.raises(CifarDataError, match="class whale has superclass fish.*aquatic_mammals"):
        load_cifar100(corrupted(tmp_path, "train", move_whales), cache_dir=cache)


# --- presets and model ------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS, ids=[f"preset={p}" for p in PRESETS])
def test_presets_are_the_maml_miniimagenet_setting(preset):
    data, _ = read_yaml(preset)
    shots = 5 if "5shot" in preset else 1
    task = data["task"]
    assert (task["name"], task["ways"], task["shots"], task["queries"], task["rotation"]) == (
        preset.split("_5way")[0], 5, shots, 15, "none")
    assert data["model"] == {"name": "conv", "filters": 32}
    assert data["meta"] == {"inner_lr": 0.01, "reduction": "sum_over_classes", "inner_steps": 5}
    assert (data["train"]["meta_batch"], data["train"]["iterations"], data["train"]["outer_lr"]) == (
        {1: 4, 5: 2}[shots], 60000, 0.001)
    assert (data["eval"]["tasks"], data["eval"]["steps"], data["eval"]["shots"], data["eval"]["queries"]) == (
        600, 10, [shots], 15)
    config = from_dict(data, source=preset)  # every key and value fits the config schema
    assert config.task.data_root == "" and config.meta.first_order is False
    from fastmaml.experiment import build_model

    model = build_model(config)  # the paper's MiniImagenet net at 32x32 RGB
    assert isinstance(model, ConvNet) and model.pool and model.head.in_features == 2 * 2 * 32


def test_the_papers_net_runs_at_32x32():
    model = ConvNet(5, in_channels=3, filters=32, pool=True, image_size=32)
    # 3->32->32->32->32 3x3 convs, 4 batch norms, 2x2 max-pools 32->16->8->4->2, linear from 2*2*32 to 5
    assert sum(p.numel() for p in model.parameters()) == (3 * 9 + 1) * 32 + 3 * (32 * 9 + 1) * 32 + 4 * 64 + 129 * 5
    assert model(torch.zeros(2, *cifar.input_shape)).shape == (2, 5)
