"""Omniglot class splits (task.split = paper | background | vinyals) and the loader's user messages."""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from omniglot_fixture import (
    DRAWINGS,
    character_counts,
    class_names,
    make_omniglot_zips,
    png_bytes,
    read_code,
    shared_omniglot_dir,
    split_layout,
    write_split_files,
)
from PIL import Image

from fastmaml.config import TaskConfig
from fastmaml.tasks import omniglot
from fastmaml.tasks.omniglot import (
    VINYALS_SPLIT_DIR,
    OmniglotDataError,
    OmniglotNotFoundError,
    background_splits,
    build_omniglot_tasks,
    decode_drawing,
    find_omniglot_zips,
    load_omniglot,
    omniglot_characters,
    omniglot_tasks,
    vinyals_splits,
)

LAYOUT = split_layout()
NAMES = class_names(LAYOUT)
INDEX = {name.split("/", 1)[1]: i for i, name in enumerate(NAMES)}
VINYALS_LINES = {
    "train": [*(f"Aa/character01/rot{d:03d}" for d in (0, 90, 180, 270)), "Aa/character02/rot000",
              "Yy/character01/rot090", "Yy/character01/rot270", "Cc/character02/rot180"],
    "val": ["Bb/character01/rot000", "Bb/character01/rot090", "Dd/character01/rot270"],
    "test": [*(f"Zz/character02/rot{d:03d}" for d in (0, 90, 180, 270)), "Yy/character02/rot000"],
}
"""A Vinyals-format split of the fixture: some characters in all rotations, some in a few, both zips in train."""


def expected_pairs(split: str) -> list[tuple[int, int]]:
    """The (store class, quarter turns) pairs of a fixture split line by line: an oracle independent of the parser."""
    pairs = []
    for line in VINYALS_LINES[split]:
        alphabet, character, rotation = line.split("/")
        pairs.append((INDEX[f"{alphabet}/{character}"], int(rotation[3:]) // 90))
    return pairs


@pytest.fixture
def data(tmp_path: Path) -> Path:
    make_omniglot_zips(tmp_path / "data", layout=LAYOUT)
    return tmp_path / "data"


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def store(data: Path, cache: Path) -> torch.Tensor:
    return load_omniglot(data, cache, expected_characters=character_counts(LAYOUT))


@pytest.fixture
def split_dir(tmp_path: Path) -> Path:
    return write_split_files(tmp_path / "vinyals", VINYALS_LINES)


def seen_pairs(episode) -> list[list[tuple[int, int]]]:
    """Per task, the (class, turns) of every image, read back from the fixture's drawn codes."""
    tasks = []
    for t in range(episode.num_tasks):
        images = torch.cat([episode.support_x[t], episode.query_x[t]])
        codes = [read_code((image[0] * 255).round().numpy()) for image in images]
        assert all(code >= 0 for code, _ in codes)
        tasks.append([(code // DRAWINGS, turns) for code, turns in codes])
    return tasks


# --- background (Lake et al.) -----------------------------------------------------------------


def test_background_split_holds_out_the_last_sorted_background_alphabets():
    splits = background_splits(NAMES)  # 7 background alphabets: Aa..Gg; the last 5 sorted are Cc..Gg
    alphabets = {s: {NAMES[i].split("/")[1] for i in ids.tolist()} for s, ids in splits.items()}
    assert alphabets == {"train": {"Aa", "Bb"}, "val": {"Cc", "Dd", "Ee", "Ff", "Gg"}, "test": {"Xx", "Yy", "Zz"}}
    assert {s: len(ids) for s, ids in splits.items()} == {"train": 5, "val": 7, "test": 5}
    everything = torch.cat(list(splits.values())).tolist()
    assert sorted(everything) == list(range(len(NAMES)))  # disjoint, and every class in one split
    assert all(NAMES[i].startswith("images_evaluation/") for i in splits["test"].tolist())


@pytest.mark.parametrize("val_alphabets", [0, 6])
def test_background_split_val_alphabets_is_a_parameter(val_alphabets):
    splits = background_splits(NAMES, val_alphabets=val_alphabets)
    assert len({NAMES[i].split("/")[1] for i in splits["train"].tolist()}) == 7 - val_alphabets


def test_background_split_must_leave_a_training_alphabet():
    with pytest.raises(ValueError, match="val_alphabets=7 but the store has 7 background alphabets"):
        background_splits(NAMES, val_alphabets=7)


def test_background_task_sources_draw_only_their_split(store):
    splits = background_splits(NAMES)
    for split in ("train", "val", "test"):
        sampler = omniglot_tasks(store, split, 3, 1, 2, rotation="per_task", scheme="background", names=NAMES)
        classes = {c for task in seen_pairs(sampler.sample(20, torch.Generator().manual_seed(1))) for c, _ in task}
        assert classes == set(splits[split].tolist())


# --- vinyals ----------------------------------------------------------------------------------


def test_vinyals_split_maps_each_line_to_its_store_class_and_rotation(split_dir):
    splits = vinyals_splits(NAMES, split_dir)
    assert {s: [tuple(row) for row in p.tolist()] for s, p in splits.items()} == {
        s: expected_pairs(s) for s in ("train", "val", "test")
    }


def test_vinyals_task_sources_draw_exactly_the_listed_character_rotations(store, split_dir):
    for split in ("train", "val", "test"):
        sampler = omniglot_tasks(store, split, 3, 1, 2, rotation="classes", scheme="vinyals", names=NAMES,
                                 split_dir=split_dir)
        assert sampler.num_classes == len(VINYALS_LINES[split])
        episode = sampler.sample(40, torch.Generator().manual_seed(0))
        seen = set()
        for t, task in enumerate(seen_pairs(episode)):
            labels = torch.cat([episode.support_y[t], episode.query_y[t]]).tolist()
            by_label = {label: {pair for pair, lab in zip(task, labels) if lab == label} for label in set(labels)}
            assert all(len(pairs) == 1 for pairs in by_label.values())  # a label is one (class, rotation)
            assert len(set().union(*by_label.values())) == 3  # three different classes per task
            seen |= set(task)
        assert seen == set(expected_pairs(split))  # nothing outside the split, everything in it reachable


def test_vinyals_rotation_turns_the_way_pil_rotate_does():
    """Prototypical networks rotated with ``PIL.Image.rotate(deg)``; the split's rot090 must be that turn."""
    with Image.open(io.BytesIO(png_bytes(37))) as image:
        buffer = io.BytesIO()
        image.rotate(90).save(buffer, format="PNG")
    pil_turned = decode_drawing(buffer.getvalue(), "rotated")
    upright = decode_drawing(png_bytes(37), "upright")
    view = omniglot.rotated_classes(torch.from_numpy(upright)[None, None], torch.tensor([[0, 1]]))
    assert read_code(pil_turned) == read_code(view[0, 0].numpy()) == (37, 1)


def test_vinyals_max_classes_keeps_the_first_listed_pairs(store, split_dir):
    sampler = omniglot_tasks(store, "train", 2, 1, 1, rotation="classes", scheme="vinyals", names=NAMES,
                             split_dir=split_dir, max_classes=3)
    pairs = {p for task in seen_pairs(sampler.sample(30, torch.Generator().manual_seed(0))) for p in task}
    assert sampler.num_classes == 3 and pairs == set(expected_pairs("train")[:3])


@pytest.mark.parametrize("rotation", ["per_task", "none"])
def test_vinyals_needs_rotations_as_classes(store, split_dir, rotation):
    with pytest.raises(ValueError, match=f"needs task.rotation=classes; got '{rotation}'"):
        omniglot_tasks(store, "train", 2, 1, 1, rotation=rotation, scheme="vinyals", names=NAMES, split_dir=split_dir)


@pytest.mark.parametrize(
    ("split", "line", "message"),
    [
        ("val", "Qq/character01/rot000", r"val.txt:4: 'Qq/character01/rot000' .*'Qq/character01' is not a character"),
        ("test", "Aa/character03/rot045", r"test.txt:6: .*rotation 'rot045' is not one of rot000"),
        ("test", "Aa/character01/rot090", r"test.txt:6: 'Aa/character01/rot090' is already listed in train.txt"),
    ],
    ids=["unknown-character", "bad-rotation", "in-two-splits"],
)
def test_vinyals_bad_line_names_the_file_and_line(tmp_path, split, line, message):
    lines = {s: [*rows, line] if s == split else rows for s, rows in VINYALS_LINES.items()}
    with pytest.raises(OmniglotDataError, match=message):
        vinyals_splits(NAMES, write_split_files(tmp_path / "bad", lines))


def test_vinyals_missing_split_file_is_a_clear_error(tmp_path):
    write_split_files(tmp_path / "partial", {"train": VINYALS_LINES["train"]})
    with pytest.raises(OmniglotNotFoundError, match=r"val.txt is missing; reinstall fastmaml"):
        vinyals_splits(NAMES, tmp_path / "partial")


def test_shipped_vinyals_files_have_the_published_sizes():
    pattern = re.compile(r"^[^/\s]+/character\d\d/rot(000|090|180|270)$")
    characters = {}
    for split, size in (("train", 4112), ("val", 688), ("test", 1692)):
        lines = (VINYALS_SPLIT_DIR / f"{split}.txt").read_text().splitlines()
        assert len(lines) == size and all(pattern.match(line) for line in lines)
        counts = Counter(line.rsplit("/", 1)[0] for line in lines)
        assert set(counts.values()) == {4}  # each character in its four rotations
        characters[split] = set(counts)
    assert {s: len(c) for s, c in characters.items()} == {"train": 1028, "val": 172, "test": 423}
    assert not (characters["train"] & characters["val"] or characters["train"] & characters["test"]
                or characters["val"] & characters["test"])


# --- build_omniglot_tasks: the single entry point ---------------------------------------------


def test_build_omniglot_tasks_reads_task_split(data, cache, split_dir, monkeypatch):
    for name, count in character_counts(LAYOUT).items():  # the fixture's counts instead of the official ones
        monkeypatch.setitem(omniglot.OMNIGLOT_CHARACTERS, name, count)
    monkeypatch.setattr(omniglot, "VINYALS_SPLIT_DIR", split_dir)
    task = TaskConfig(name="omniglot", ways=2, rotation="classes", data_root=str(data), cache_dir=str(cache))

    def sizes(split_scheme: str) -> dict[str, int]:
        task.split = split_scheme  # a TaskConfig field once config.py has it; set as an attribute until then
        return {s: build_omniglot_tasks(task, s, shots=1, queries=1, device="cpu").num_classes
                for s in ("train", "val", "test")}

    assert sizes("background") == {"train": 4 * 5, "val": 4 * 7, "test": 4 * 5}
    assert sizes("vinyals") == {"train": 8, "val": 3, "test": 5}
    paper = omniglot.omniglot_splits(len(NAMES), num_train=10, num_val=3)  # 1,100/100 do not fit 17 classes
    monkeypatch.setattr(omniglot, "omniglot_splits", lambda n, **kw: paper)
    assert sizes("paper") == sizes("") == {s: 4 * len(ids) for s, ids in paper.items()}
    task.max_classes = 2
    assert build_omniglot_tasks(task, "train", shots=1, queries=1, device="cpu").num_classes == 8  # 2 x 4 turns
    task.split = "lake"
    with pytest.raises(ValueError, match="task.split must be one of paper, background, vinyals; got 'lake'"):
        build_omniglot_tasks(task, "train", shots=1, queries=1, device="cpu")


# --- messages (Dependable runs, item 12) ------------------------------------------------------


def test_no_data_folder_tells_train_users_the_override_not_a_flag(cache, monkeypatch):
    monkeypatch.delenv("FASTMAML_DATA", raising=False)
    with pytest.raises(OmniglotNotFoundError) as info:
        load_omniglot(None, cache)
    message = str(info.value)
    assert "task.data_root=DIR" in message and "FASTMAML_DATA=DIR" in message
    assert message.count("--data-root") == 1 and "`fastmaml demo` takes --data-root DIR" in message


def test_missing_zips_say_how_to_point_at_them(tmp_path):
    with pytest.raises(OmniglotNotFoundError, match=r"point task.data_root=DIR \(or FASTMAML_DATA=DIR\)") as info:
        find_omniglot_zips(tmp_path)
    assert "--data-root" not in str(info.value)


def test_first_decode_says_where_and_how_long_before_decoding(data, cache, monkeypatch, capsys):
    decode = omniglot.decode_omniglot
    said_before = []

    def spy(*args, **kwargs):
        said_before.append(capsys.readouterr().err)
        return decode(*args, **kwargs)

    monkeypatch.setattr(omniglot, "decode_omniglot", spy)
    counts = character_counts(LAYOUT)
    load_omniglot(data, cache, expected_characters=counts)
    (cached,) = cache.iterdir()
    assert said_before == [f"decoding the Omniglot zips in {data} once (~10 s), cached at {cached}\n"]
    load_omniglot(data, cache, expected_characters=counts)  # a cache hit decodes nothing and says nothing
    assert len(said_before) == 1 and capsys.readouterr() == ("", "")


# --- the real data (skipped where the shared data folder is absent) --------------------------

REAL = shared_omniglot_dir()
needs_real = pytest.mark.skipif(REAL is None, reason="real Omniglot zips not found (set FASTMAML_DATA)")


@needs_real
def test_shipped_vinyals_files_equal_the_shared_copy():
    shared = REAL / "splits" / "vinyals"
    if not shared.is_dir():
        pytest.skip(f"no {shared}")
    for split in ("train", "val", "test"):
        assert (VINYALS_SPLIT_DIR / f"{split}.txt").read_bytes() == (shared / f"{split}.txt").read_bytes()


@needs_real
def test_real_split_sizes():
    names = omniglot_characters(REAL)
    background = background_splits(names)
    assert {s: len(ids) for s, ids in background.items()} == {"train": 813, "val": 151, "test": 659}
    held_out = sorted({names[i].split("/")[1] for i in background["val"].tolist()})
    assert held_out == ["Ojibwe_(Canadian_Aboriginal_Syllabics)", "Sanskrit", "Syriac_(Estrangelo)", "Tagalog",
                        "Tifinagh"]  # as the module docstring says
    vinyals = vinyals_splits(names)
    assert {s: len(p) for s, p in vinyals.items()} == {"train": 4112, "val": 688, "test": 1692}
    test_characters = {names[c] for c in vinyals["test"][:, 0].tolist()}
    assert "images_evaluation/Gurmukhi/character42" in test_characters and len(test_characters) == 423


@needs_real
def test_real_vinyals_tasks_show_the_listed_rotated_characters(real_omniglot_cache):
    store = load_omniglot(REAL, real_omniglot_cache)
    task = TaskConfig(name="omniglot", ways=5, rotation="classes", data_root=str(REAL),
                      cache_dir=str(real_omniglot_cache))
    task.split = "vinyals"
    sampler = build_omniglot_tasks(task, "test", shots=1, queries=1, device="cpu")
    assert sampler.num_classes == 1692
    pairs = vinyals_splits(omniglot_characters(REAL))["test"]
    episode = sampler.sample(2, torch.Generator().manual_seed(0))
    listed = {}
    for c, k in pairs.tolist():  # every rotated drawing of the split, by its pixels
        for image in torch.rot90(store[c], k, dims=(-2, -1)):
            listed.setdefault(image.numpy().tobytes(), set()).add((c, k))
    for image in torch.cat([episode.support_x.flatten(0, 1), episode.query_x.flatten(0, 1)]):
        pixels = (image[0] * 255).round().to(torch.uint8).numpy()
        assert pixels.tobytes() in listed, "an image that is no listed (character, rotation)"
