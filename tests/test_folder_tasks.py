"""Labelled task sources: arrays, Datasets and ImageFolder layouts with ragged classes; splits; shipped split files."""

from __future__ import annotations

import doctest
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fastmaml.tasks import folder, labelled
from fastmaml.tasks.episodes import ROTATIONS, EpisodeSampler
from fastmaml.tasks.folder import (
    CorruptImagesWarning,
    FolderDataError,
    FolderNotFoundError,
    build_folder_tasks,
    load_image_folder,
)
from fastmaml.tasks.labelled import (
    LabelledData,
    LabelledDataError,
    LabelledNotFoundError,
    LabelledTasks,
    SmallClassesWarning,
    read_class_split,
    resolve_split_file,
    split_classes,
)

SIZE = 12
"""Side of the generated fixture images (decoded at this size, so pixels are not resampled)."""


def level(c: int) -> int:
    """The grey level that encodes class ``c`` in fixture images (far enough apart to survive JPEG)."""
    return 15 + 18 * c


def class_of(value: float) -> int:
    return round((value - 15) / 18)


def write_image(path: Path, value: int | tuple[int, int, int], size: int = SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if isinstance(value, int) else "RGB"
    Image.new(mode, (size, size), value).save(path, quality=95) if path.suffix == ".jpg" else \
        Image.new(mode, (size, size), value).save(path)


def make_folder(root: Path, counts: list[int]) -> Path:
    """ImageFolder layout: class ``c`` is folder ``class{c:02d}`` with ``counts[c]`` images of grey ``level(c)``:
    PNGs, every third class JPEGs, and the last two images of every class one folder down."""
    for c, count in enumerate(counts):
        for e in range(count):
            suffix = ".jpg" if c % 3 == 2 else ".png"
            sub = "nested/" if e >= count - 2 and count > 3 else ""
            write_image(root / f"class{c:02d}" / f"{sub}img{e:02d}{suffix}", level(c))
    return root


def flat_pairs(data_counts: list[int]) -> tuple[np.ndarray, list[str]]:
    """Float features ``(class, example)`` per row, rows in a scrambled order, string labels."""
    rows = [(c, e) for c, n in enumerate(data_counts) for e in range(n)]
    order = np.random.default_rng(0).permutation(len(rows))
    x = np.array([rows[i] for i in order], dtype=np.float32)
    return x, [f"k{int(c):02d}" for c in x[:, 0]]


def check_episode_layout(episode, tasks: int, ways: int, shots: int, queries: int) -> None:
    assert episode.support_x.shape[:2] == (tasks, ways * shots)
    assert episode.query_x.shape[:2] == (tasks, ways * queries)
    assert episode.support_y.dtype == episode.query_y.dtype == torch.int64
    for y, k in ((episode.support_y, shots), (episode.query_y, queries)):
        grouped = y.view(tasks, ways, k)
        assert (grouped == grouped[..., :1]).all(), "labels are grouped by class"
        assert (grouped[..., 0].sort(dim=1).values == torch.arange(ways)).all(), "each label 0..N-1 once"


# --- arrays -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rotation", ROTATIONS, ids=[f"rotation={r}" for r in ROTATIONS])
def test_equal_classes_give_exactly_episode_samplers_episodes(rotation: str) -> None:
    """Same generator, same store: the ragged sampler must reproduce EpisodeSampler bit for bit."""
    store = torch.randint(0, 256, (12, 6, 8, 8), dtype=torch.uint8)
    data = LabelledData(store.reshape(72, 1, 8, 8), torch.full((12,), 6), tuple(f"c{i:02d}" for i in range(12)))
    ours = LabelledTasks(data, ways=3, shots=2, queries=3, rotation=rotation)
    reference = EpisodeSampler(store, ways=3, shots=2, queries=3, rotation=rotation)
    a = ours.sample(7, torch.Generator().manual_seed(3))
    b = reference.sample(7, torch.Generator().manual_seed(3))
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert ours.input_shape == (1, 8, 8)


def test_ragged_classes_give_valid_tasks_and_cover_every_example() -> None:
    counts = [4, 11, 5, 7, 9, 4, 6, 10]
    x, y = flat_pairs(counts)
    data = LabelledData.from_arrays(x, y)
    assert data.names == tuple(f"k{c:02d}" for c in range(8)) and data.counts.tolist() == counts
    tasks = LabelledTasks(data, ways=5, shots=2, queries=2)
    episode = tasks.sample(300, torch.Generator().manual_seed(0))
    check_episode_layout(episode, 300, 5, 2, 2)
    assert episode.support_x.dtype == torch.float32 and tasks.input_shape == (2,)
    support = episode.support_x.view(300, 5, 2, 2)
    query = episode.query_x.view(300, 5, 2, 2)
    both = torch.cat([support, query], dim=2)  # [T, N, K+Q, (class, example)]
    assert (both[..., 0] == both[..., :1, 0]).all(), "support and query of a label come from one class"
    assert all(len(set(row.tolist())) == 5 for row in both[:, :, 0, 0]), "a task's classes are distinct"
    examples = both[..., 1]
    assert (examples.sort(dim=2).values.diff(dim=2) > 0).all(), "no example twice in a (task, class)"
    limit = torch.tensor(counts, dtype=torch.float32)[both[..., 0].long()]
    assert (examples < limit).all() and (examples >= 0).all()
    seen = {tuple(map(int, pair)) for pair in both.reshape(-1, 2).tolist()}
    assert seen == {(c, e) for c, n in enumerate(counts) for e in range(n)}, "every example of every class is drawn"
    labels = episode.support_y.view(300, 5, 2)[..., 0]
    assert torch.equal(labels, episode.query_y.view(300, 5, 2)[..., 0]), "support and query agree on labels"


def test_small_classes_warn_once_and_are_never_drawn() -> None:
    counts = [3, 8, 2, 9, 8, 7, 8, 6]
    x, y = flat_pairs(counts)
    data = LabelledData.from_arrays(x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tasks = LabelledTasks(data, ways=3, shots=2, queries=2)
        episode = tasks.sample(200, torch.Generator().manual_seed(1))
        tasks.sample(5, torch.Generator().manual_seed(2))
    assert [type(w.message) for w in caught] == [SmallClassesWarning]
    assert "2 of the 8 classes" in str(caught[0].message) and "k00 (3), k02 (2)" in str(caught[0].message)
    drawn = set(episode.support_x[..., 0].unique().long().tolist())
    assert drawn == {1, 3, 4, 5, 6, 7}
    assert tasks.class_names == ("k01", "k03", "k04", "k05", "k06", "k07")


def test_too_few_usable_classes_is_an_error() -> None:
    x, y = flat_pairs([3, 8, 2, 9])
    with pytest.warns(SmallClassesWarning), pytest.raises(LabelledDataError, match="only 2 classes with at least"):
        LabelledTasks(LabelledData.from_arrays(x, y), ways=3, shots=2, queries=2, where="split 'val'")


def test_labels_strings_and_integers_order_classes() -> None:
    x = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    data = LabelledData.from_arrays(x, [10, 2, 2, 10, 1])
    assert data.names == ("1", "2", "10") and data.counts.tolist() == [1, 2, 2]
    assert data.examples[:, 0].tolist() == [16.0, 4.0, 8.0, 0.0, 12.0], "grouped by class, input order kept"
    data = LabelledData.from_arrays(torch.from_numpy(x), np.array(["b", "a", "b", "c", "a"]))
    assert data.names == ("a", "b", "c") and data.examples[:, 0].tolist() == [4.0, 16.0, 0.0, 8.0, 12.0]


def test_uint8_arrays_are_images_scaled_to_unit_range() -> None:
    x = np.repeat(np.arange(6, dtype=np.uint8)[:, None, None] * 40, 25, axis=1).reshape(6, 5, 5)
    data = LabelledData.from_arrays(x, [0, 0, 1, 1, 2, 2])
    assert data.input_shape == (1, 5, 5)
    episode = LabelledTasks(data, ways=3, shots=1, queries=1).sample(4, torch.Generator().manual_seed(0))
    values = episode.support_x.flatten(2)
    assert (values == values[..., :1]).all() and set((values[..., 0] * 255).round().int().unique().tolist()) <= {
        0, 40, 80, 120, 160, 200}
    assert episode.support_x.max() <= 1.0


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((4, 8, 8, 3), np.uint8), [0, 1, 2, 3], "looks channels-last"),
        (np.zeros((4, 3), np.int64), [0, 1, 2, 3], "uint8 pixels .* or float features"),
        (np.zeros((4, 3), np.float32), [0, 1, 2], "3 labels for 4 examples"),
        (np.zeros((4, 3), np.float32), [0, "a", 1, 2], "all integers or all strings"),
        (np.zeros((4,), np.float32), [0, 1, 2, 3], r"shape \[n, \.\.\.\]"),
    ],
    ids=["channels-last", "int64-x", "label-count", "mixed-labels", "1-d-x"],
)
def test_bad_arrays_are_clear_errors(x: np.ndarray, y: list, message: str) -> None:
    with pytest.raises(LabelledDataError, match=message):
        LabelledData.from_arrays(x, y)


def test_rotation_of_ragged_images_is_one_quarter_turn_per_class_and_task() -> None:
    """Each image has one bright corner pixel; a rotation moves it to another corner, the same for a whole class."""
    counts = [5, 9, 6, 4, 7, 8]
    images, labels = [], []
    for c, n in enumerate(counts):
        for _ in range(n):
            img = np.zeros((6, 6), np.uint8)
            img[0, 0] = 10 * (c + 1)
            images.append(img)
            labels.append(c)
    data = LabelledData.from_arrays(np.stack(images), labels)
    corners = torch.tensor([[0, 0], [5, 0], [5, 5], [0, 5]])  # where rot90 by r moves (0, 0)
    for rotation in ("per_task", "classes"):
        episode = LabelledTasks(data, ways=4, shots=2, queries=2, rotation=rotation).sample(
            100, torch.Generator().manual_seed(0))
        x = torch.cat([episode.support_x.view(100, 4, 2, 6, 6), episode.query_x.view(100, 4, 2, 6, 6)], dim=2)
        bright = (x > 0).flatten(-2).float().argmax(-1)  # [T, N, K+Q] flat position of the bright pixel
        turn = torch.stack([(bright == int(r * 6 + col)) for r, col in corners], -1).float().argmax(-1)
        assert (x > 0).flatten(-2).sum(-1).eq(1).all()
        assert (turn == turn[..., :1]).all(), f"{rotation}: one rotation per class in a task"
        assert set(turn.unique().tolist()) == {0, 1, 2, 3}, f"{rotation}: all four rotations occur"


def test_rotation_needs_square_images() -> None:
    with pytest.raises(LabelledDataError, match="needs square images"):
        LabelledTasks(LabelledData.from_arrays(np.zeros((8, 3), np.float32), [0, 1] * 4), ways=2, shots=1,
                      queries=1, rotation="per_task")


def test_sampling_is_a_function_of_the_generator() -> None:
    x, y = flat_pairs([6, 7, 8, 5, 9])
    tasks = LabelledTasks(LabelledData.from_arrays(x, y), ways=3, shots=1, queries=3)
    a, b = (tasks.sample(10, torch.Generator().manual_seed(5)) for _ in range(2))
    c = tasks.sample(10, torch.Generator().manual_seed(6))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    assert not torch.equal(a.query_x, c.query_x)


class PairDataset(torch.utils.data.Dataset):
    """(x, label) items, as a torchvision-style dataset yields them."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_torch_datasets_of_tensors_and_pil_images() -> None:
    tensors = PairDataset([(torch.full((1, 4, 4), float(c)), torch.tensor(c)) for c in (2, 0, 1, 2, 0, 1, 1, 0, 2)])
    data = LabelledData.from_dataset(tensors)
    assert data.names == ("0", "1", "2") and data.counts.tolist() == [3, 3, 3]
    episode = LabelledTasks(data, ways=3, shots=1, queries=2).sample(6, torch.Generator().manual_seed(0))
    assert episode.support_x.dtype == torch.float32 and episode.support_x.shape == (6, 3, 1, 4, 4)
    support = episode.support_x[:, :, 0, 0, 0]  # features served as stored: class c is the value c
    query = episode.query_x[:, :, 0, 0, 0].view(6, 3, 2)
    assert (support.sort(dim=1).values == torch.tensor([0.0, 1.0, 2.0])).all()
    assert (query == support.unsqueeze(-1)).all(), "query images of a label show the support's class"
    pil = PairDataset([(Image.new("RGB", (5, 5), (c * 50, 0, 0)), f"c{c}") for c in (0, 1, 1, 0)])
    data = LabelledData.from_dataset(pil)
    assert data.examples.dtype == torch.uint8 and data.input_shape == (3, 5, 5)
    assert data.examples[:, 0, 0, 0].tolist() == [0, 0, 50, 50]
    with pytest.raises(LabelledDataError, match="different shapes"):
        LabelledData.from_dataset(PairDataset([(np.zeros(3, np.float32), 0), (np.zeros(4, np.float32), 1)]))


def test_module_example_runs() -> None:
    result = doctest.testmod(labelled, verbose=False)
    assert result.attempted >= 5 and result.failed == 0


# --- splits -----------------------------------------------------------------------------------


def test_seeded_split_is_disjoint_sized_and_independent_of_input_order() -> None:
    names = [f"n{i:03d}" for i in range(50)]
    split = split_classes(names, seed=0)
    assert [len(split[s]) for s in ("train", "val", "test")] == [32, 8, 10]
    assert sorted(split["train"] + split["val"] + split["test"]) == names
    assert split_classes(list(reversed(names)), seed=0) == split
    assert split_classes(names, seed=1) != split
    assert [len(v) for v in split_classes([f"c{i}" for i in range(100)]).values()] == [64, 16, 20]
    with pytest.raises(LabelledDataError, match="cannot be split"):
        split_classes(["a", "b"])


@pytest.mark.parametrize("kind", ["yaml", "json"])
def test_split_files_are_read_and_checked(tmp_path: Path, kind: str) -> None:
    known = [f"c{i}" for i in range(10)]
    good = {"train": ["c0", "c1", "c2"], "val": ["c3"], "test": ["c4", "c5"]}
    path = tmp_path / f"split.{kind}"
    dump = json.dumps if kind == "json" else yaml.safe_dump
    path.write_text(dump(good))
    assert read_class_split(path, known) == good
    bad = dict(good, test=["c4", "x1", "x2", "x3", "x4", "x5", "x6", "x7"])
    path.write_text(dump(bad))
    with pytest.raises(LabelledDataError, match=r"names 7 classes the data does not have: x1, x2, x3, x4, x5, "
                                                r"\.\.\. \(7 in all\)"):
        read_class_split(path, known)
    path.write_text(dump(dict(good, val=["c3", "c0"])))
    with pytest.raises(LabelledDataError, match="'c0' is listed in both train and val"):
        read_class_split(path, known)
    path.write_text(dump({"train": ["c0"], "val": ["c1"]}))
    with pytest.raises(LabelledDataError, match="exactly the keys train, val, test"):
        read_class_split(path, known)
    with pytest.raises(LabelledNotFoundError, match="does not exist") as error:
        read_class_split(tmp_path / "missing.yaml", known)
    assert isinstance(error.value, FileNotFoundError)


def test_shipped_cub_split_is_closer_look_rule() -> None:
    path = resolve_split_file("cub_closer_look")
    assert path.is_file() and path.name == "cub_closer_look.yaml"
    split = yaml.safe_load(path.read_text())
    assert {k: len(v) for k, v in split.items()} == {"train": 100, "val": 50, "test": 50}
    names = split["train"] + split["val"] + split["test"]
    assert len(set(names)) == 200 and all(re.fullmatch(r"\d{3}\.[A-Za-z_]+", n) for n in names)
    assert sorted(int(n[:3]) for n in names) == list(range(1, 201))
    # write_CUB_filelist.py: 0-based index i of the sorted folders, base i%2==0, val i%4==1, novel i%4==3
    for name in names:
        i = int(name[:3]) - 1
        expected = "train" if i % 2 == 0 else "val" if i % 4 == 1 else "test"
        assert name in split[expected]
    assert "001.Black_footed_Albatross" in split["train"] and "002.Laysan_Albatross" in split["val"]
    assert "200.Common_Yellowthroat" in split["test"]
    assert read_class_split("cub_closer_look", names) == split


def test_shipped_tieredimagenet_split_has_351_97_160_disjoint_synsets() -> None:
    split = yaml.safe_load(resolve_split_file("tieredimagenet").read_text())
    assert {k: len(v) for k, v in split.items()} == {"train": 351, "val": 97, "test": 160}
    names = split["train"] + split["val"] + split["test"]
    assert len(set(names)) == 608 and all(re.fullmatch(r"n\d{8}", n) for n in names)
    assert split["train"][0] == "n01530575" and split["val"][0] == "n02099267" and split["test"][0] == "n03314780"


# --- image folders ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twelve_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 classes of 4 to 9 images (unequal sizes), PNG and JPEG, some nested one level. Do not modify."""
    return make_folder(tmp_path_factory.mktemp("folder") / "root", [4 + (c * 5) % 6 for c in range(12)])


def folder_task(root: Path, cache: Path, **overrides) -> SimpleNamespace:
    fields = dict(name="folder", data_root=str(root), image_size=SIZE, channels=1, split_file="", split_seed=0,
                  rotation="none", cache_dir=str(cache), ways=2, max_classes=0)
    return SimpleNamespace(**{**fields, **overrides})


def test_folder_tasks_by_split(twelve_classes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    splits = {}
    for split in ("train", "val", "test"):
        tasks = build_folder_tasks(folder_task(twelve_classes, tmp_path), split, shots=1, queries=3, device="cpu")
        splits[split] = set(tasks.class_names)
        assert tasks.input_shape == (1, SIZE, SIZE)
        episode = tasks.sample(20, torch.Generator().manual_seed(0))
        check_episode_layout(episode, 20, 2, 1, 3)
        assert episode.support_x.shape[2:] == (1, SIZE, SIZE) and episode.query_x.dtype == torch.float32
        both = torch.cat([episode.support_x.view(20, 2, 1, -1), episode.query_x.view(20, 2, 3, -1)], dim=2) * 255
        classes = (both[..., 0] - 15).div(18).round()
        assert ((both - level(0)) / 18 - classes.unsqueeze(-1)).abs().max() < 0.2, "images are uniform class levels"
        assert (classes == classes[..., :1]).all(), "support and query of a label show one class"
        names = {f"class{int(c):02d}" for c in classes.unique()}
        assert names <= splits[split], "only the split's classes are drawn"
    assert [len(splits[s]) for s in ("train", "val", "test")] == [8, 2, 2]
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"] or splits["val"] & splits["test"])
    err = capsys.readouterr().err
    assert err.count("decoding ") == 1 and f"decoding 78 images of {twelve_classes} once, cached at {tmp_path}" in err


def test_folder_options_max_classes_split_file_and_too_few_classes(twelve_classes: Path, tmp_path: Path) -> None:
    task = folder_task(twelve_classes, tmp_path, max_classes=3)
    assert len(build_folder_tasks(task, "train", shots=1, queries=1, device="cpu").class_names) == 3
    assert len(build_folder_tasks(task, "test", shots=1, queries=1, device="cpu").class_names) == 2
    split_file = tmp_path / "mine.yaml"
    split_file.write_text(yaml.safe_dump({"train": ["class03", "class00", "class07"], "val": ["class01", "class02"],
                                          "test": ["class04", "class05"]}))
    task = folder_task(twelve_classes, tmp_path, split_file=str(split_file), ways=3)
    assert build_folder_tasks(task, "train", shots=1, queries=2, device="cpu").class_names == (
        "class03", "class00", "class07")
    message = re.escape(f"ways=3 but split 'val' of {twelve_classes} has only 2 classes")
    with pytest.raises(LabelledDataError, match=message):
        build_folder_tasks(task, "val", shots=1, queries=2, device="cpu")
    split_file.write_text(yaml.safe_dump({"train": ["class03", "Class99"], "val": [], "test": []}))
    with pytest.raises(LabelledDataError, match="does not have: Class99"):
        build_folder_tasks(task, "train", shots=1, queries=2, device="cpu")


def test_folder_unequal_classes_warn_and_rgb_resize(twelve_classes: Path, tmp_path: Path) -> None:
    task = folder_task(twelve_classes, tmp_path, image_size=5, channels=3, rotation="classes", ways=5)
    with pytest.warns(SmallClassesWarning, match=r"fewer than shots \+ queries = 8 examples"):
        tasks = build_folder_tasks(task, "train", shots=3, queries=5, device="cpu")
    assert tasks.input_shape == (3, 5, 5)
    x = tasks.sample(3, torch.Generator().manual_seed(0)).support_x
    assert x.shape == (3, 15, 3, 5, 5) and torch.equal(x[:, :, 0], x[:, :, 2]), "grey images give R == B"


def test_folder_skips_other_files_and_warns_of_corrupt_images(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folder(tmp_path / "root", [3, 4, 3])
    (root / "notes.txt").write_text("not an image")
    (root / "class01" / "labels.csv").write_text("a,b")
    (root / "class01" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_image(root / "class02" / "red.png", (255, 0, 0))
    (root / "class00" / "deep" / "deeper").mkdir(parents=True)
    write_image(root / "class00" / "deep" / "deeper" / "ignored.png", 0)
    with pytest.warns(CorruptImagesWarning, match=r"1 of the 12 image files .* class01/broken.png"):
        data = load_image_folder(root, image_size=SIZE, channels=1, cache_dir=tmp_path / "cache")
    err = capsys.readouterr().err
    assert "skipped 2 non-image files" in err and "notes.txt" in err and "class01/labels.csv" in err
    assert data.names == ("class00", "class01", "class02") and data.counts.tolist() == [3, 4, 4]
    assert data.examples.shape == (11, 1, SIZE, SIZE) and data.examples.dtype == torch.uint8
    values = data.examples.flatten(1).float()
    assert [class_of(v) for v in values[:7, 0].tolist()] == [0, 0, 0, 1, 1, 1, 1]
    assert (values[:10].std(dim=1) < 1).all(), "uniform images stay uniform"
    assert round(values[10, 0].item()) == 76, "red (255, 0, 0) in greyscale: L = 0.299 * 255"
    with pytest.warns(CorruptImagesWarning):  # still told on a cached load, and no decode
        again = load_image_folder(root, image_size=SIZE, channels=1, cache_dir=tmp_path / "cache")
    assert torch.equal(again.examples, data.examples) and "decoding" not in capsys.readouterr().err


def test_folder_cache_is_reused_and_invalidated(twelve_classes: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root = shutil.copytree(twelve_classes, tmp_path / "root")
    first = load_image_folder(root, image_size=SIZE, channels=1, cache_dir=tmp_path / "cache", workers=1)
    real_decode = folder.decode_image

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(folder, "decode_image", must_not_decode)
    again = load_image_folder(root, image_size=SIZE, channels=1, cache_dir=tmp_path / "cache")
    assert torch.equal(first.examples, again.examples) and torch.equal(first.counts, again.counts)
    image = root / "class00" / "img00.png"
    write_image(image, level(5))
    os.utime(image, ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded again"):
        load_image_folder(root, image_size=SIZE, channels=1, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(folder, "decode_image", real_decode)
    changed = load_image_folder(root, image_size=SIZE, channels=1, cache_dir=tmp_path / "cache")
    assert class_of(changed.examples[0, 0, 0, 0].item()) == 5
    other_size = load_image_folder(root, image_size=4, channels=1, cache_dir=tmp_path / "cache")
    assert other_size.input_shape == (1, 4, 4)


def test_folder_layout_errors_name_the_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FolderNotFoundError, match=f"image folder {re.escape(str(missing))} does not exist") as error:
        load_image_folder(missing, cache_dir=tmp_path)
    assert isinstance(error.value, FileNotFoundError)
    loose = tmp_path / "loose"
    write_image(loose / "a.png", 3)
    with pytest.raises(FolderDataError, match=r"has no class folders .*\(a.png\) must be sorted into one folder"):
        load_image_folder(loose, cache_dir=tmp_path)
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(FolderDataError, match="has no class folders \\(it is empty\\)"):
        load_image_folder(tmp_path / "empty_root", cache_dir=tmp_path)
    root = make_folder(tmp_path / "root", [3, 3])
    (root / "class02").mkdir()
    with pytest.raises(FolderDataError, match=re.escape(f"class folder {root / 'class02'} holds no image files")):
        load_image_folder(root, cache_dir=tmp_path)
    parent = tmp_path / "parent"
    make_folder(parent / "images", [3, 3])
    only = re.escape(str(parent / "images"))
    with pytest.raises(FolderDataError, match=f"has only one class folder .* set task.data_root to {only}"):
        load_image_folder(parent, cache_dir=tmp_path)
    with pytest.raises(FolderDataError, match="task.channels must be 1"):
        load_image_folder(root, channels=2, cache_dir=tmp_path)
    (parent / "attributes" / "sub").mkdir(parents=True)
    attributes = re.escape(str(parent / "attributes"))
    with pytest.raises(FolderDataError, match=f"holds no image files .*set task.data_root to {attributes}"):
        load_image_folder(parent, cache_dir=tmp_path)
    with pytest.raises(FolderNotFoundError, match="needs task.data_root"):
        build_folder_tasks(folder_task(root, tmp_path, data_root=""), "train", shots=1, queries=1, device="cpu")
