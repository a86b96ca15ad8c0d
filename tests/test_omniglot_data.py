"""Omniglot from the zips: decoding, ordering, cache, errors, splits, download, and the real files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import random
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from omniglot_fixture import (
    DRAWINGS,
    class_names,
    make_omniglot_zips,
    png_bytes,
    read_code,
    shared_omniglot_dir,
)
from PIL import Image

from fastmaml.config import TaskConfig
from fastmaml.tasks import omniglot
from fastmaml.tasks.omniglot import (
    OmniglotDataError,
    OmniglotNotFoundError,
    build_omniglot_tasks,
    download_omniglot,
    find_omniglot_zips,
    load_omniglot,
    omniglot_characters,
    omniglot_splits,
    omniglot_tasks,
)

CLASSES = len(class_names())


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A data root with both fixture zips, and their character counts."""
    return tmp_path / "data", make_omniglot_zips(tmp_path / "data")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def store(data, cache) -> torch.Tensor:
    root, counts = data
    return load_omniglot(root, cache, expected_characters=counts)


def pil_oracle(zip_path: Path, entry: str, antialias: bool) -> np.ndarray:
    """Independent decode of one drawing: the original script's Pillow calls, then ``1 - image``."""
    with zipfile.ZipFile(zip_path) as archive, Image.open(io.BytesIO(archive.read(entry))) as image:
        image = image.convert("L") if antialias else image  # Pillow resizes 1-bit images with NEAREST
        small = np.asarray(image.resize((28, 28), Image.Resampling.LANCZOS).convert("L"))
    return 255 - small


# --- decoding ---------------------------------------------------------------------------------


def test_decode_gives_uint8_store_with_bright_strokes(store):
    assert store.shape == (CLASSES, DRAWINGS, 28, 28) and store.dtype == torch.uint8
    # fixture strokes: the top-left cell always, the other corner cells never (Lanczos rings a little)
    assert (store[:, :, 1:4, 1:4] > 200).all() and store[:, :, :5, :5].max() == 255
    assert (store[:, :, -4:-1, -4:-1] < 55).all() and store[:, :, -5:, -5:].min() == 0


def test_classes_sorted_background_first_and_drawings_in_file_order(data, store):
    root, counts = data
    assert omniglot_characters(root, counts) == class_names()
    codes = [[read_code(store[c, d].numpy()) for d in range(DRAWINGS)] for c in range(CLASSES)]
    assert codes == [[(c * DRAWINGS + d, 0) for d in range(DRAWINGS)] for c in range(CLASSES)]


@pytest.mark.parametrize("antialias", [True, False], ids=["antialias=lanczos", "antialias=off-nearest"])
def test_decode_matches_pillow_oracle(data, cache, antialias):
    root, counts = data
    store = load_omniglot(root, cache, antialias=antialias, expected_characters=counts)
    character = "images_evaluation/Beta/character02"
    assert class_names()[8] == character
    with zipfile.ZipFile(root / "images_evaluation.zip") as archive:
        entry = sorted(n for n in archive.namelist() if n.startswith(character + "/") and n.endswith(".png"))[2]
    assert np.array_equal(store[8, 2].numpy(), pil_oracle(root / "images_evaluation.zip", entry, antialias))
    levels = len(np.unique(store.numpy()))
    assert levels > 2 if antialias else levels == 2  # the original script's output was binary


def test_zips_may_sit_in_an_omniglot_subfolder(tmp_path, cache):
    counts = make_omniglot_zips(tmp_path / "root" / "omniglot")
    assert find_omniglot_zips(tmp_path / "root")[0] == tmp_path / "root" / "omniglot" / "images_background.zip"
    assert load_omniglot(tmp_path / "root", cache, expected_characters=counts).shape[0] == CLASSES


def test_data_root_and_cache_dir_default_from_environment(data, tmp_path, monkeypatch):
    root, counts = data
    monkeypatch.setenv("FASTMAML_DATA", str(root))
    monkeypatch.setenv("FASTMAML_CACHE", str(tmp_path / "env-cache"))
    load_omniglot(expected_characters=counts)
    assert len(list((tmp_path / "env-cache").glob("omniglot-*.npy"))) == 1


# --- cache ------------------------------------------------------------------------------------


def count_decodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = omniglot.decode_omniglot

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(omniglot, "decode_omniglot", spy)
    return calls


def test_second_load_hits_the_cache(data, cache, monkeypatch):
    root, counts = data
    calls = count_decodes(monkeypatch)
    first = load_omniglot(root, cache, expected_characters=counts)
    start = time.perf_counter()
    second = load_omniglot(root, cache, expected_characters=counts)
    assert time.perf_counter() - start < 1.0
    assert len(calls) == 1 and torch.equal(first, second)
    assert [p.suffix for p in cache.iterdir()] == [".npy"]  # no temp file left behind


def test_cache_is_invalidated_when_a_zip_or_the_size_changes(data, cache, monkeypatch):
    root, counts = data
    calls = count_decodes(monkeypatch)
    first = load_omniglot(root, cache, expected_characters=counts)
    make_omniglot_zips(root, code_offset=1000)
    changed = load_omniglot(root, cache, expected_characters=counts)
    assert len(calls) == 2 and not torch.equal(first, changed)
    assert read_code(changed[0, 0].numpy()) == (1000, 0)
    assert load_omniglot(root, cache, image_size=14, expected_characters=counts).shape[-2:] == (14, 14)
    assert len(calls) == 3 and len(list(cache.glob("*.npy"))) == 3


def test_unreadable_cache_is_rebuilt(data, cache, monkeypatch):
    root, counts = data
    first = load_omniglot(root, cache, expected_characters=counts)
    (path,) = cache.glob("*.npy")
    path.write_bytes(path.read_bytes()[:100])
    calls = count_decodes(monkeypatch)
    assert torch.equal(load_omniglot(root, cache, expected_characters=counts), first) and len(calls) == 1


# --- errors -----------------------------------------------------------------------------------


def test_missing_zips_name_the_download_command(tmp_path, cache):
    with pytest.raises(OmniglotNotFoundError, match="fastmaml data omniglot --download") as info:
        load_omniglot(tmp_path / "nowhere", cache)
    assert isinstance(info.value, FileNotFoundError) and "images_background.zip" in str(info.value)


def test_no_root_and_no_environment_variable_says_how_to_set_one(cache, monkeypatch):
    monkeypatch.delenv("FASTMAML_DATA", raising=False)
    with pytest.raises(OmniglotNotFoundError, match="FASTMAML_DATA"):
        load_omniglot(None, cache)


def test_truncated_zip_is_a_clear_error(data, cache):
    root, counts = data
    path = root / "images_evaluation.zip"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OmniglotDataError, match="truncated or corrupt") as info:
        load_omniglot(root, cache, expected_characters=counts)
    assert str(path) in str(info.value) and f"--download {root}" in str(info.value)


def test_undecodable_png_names_the_entry(tmp_path, cache):
    counts = make_omniglot_zips(tmp_path / "data", broken_entry=5)
    with pytest.raises(OmniglotDataError, match=r"images_background/.*\.png is not a decodable PNG.*--download"):
        load_omniglot(tmp_path / "data", cache, expected_characters=counts)
    assert not cache.exists() or not list(cache.iterdir())


def test_corrupted_bytes_inside_a_zip_are_a_clear_error(data, cache):
    root, counts = data
    path = root / "images_background.zip"
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(".png"))
    start = info.header_offset + 30 + len(info.filename.encode())  # local header, then the data
    raw[start : start + 8] = bytes(b ^ 0xFF for b in raw[start : start + 8])
    path.write_bytes(bytes(raw))
    with pytest.raises(OmniglotDataError, match=f"{info.filename} is not a decodable PNG"):
        load_omniglot(root, cache, expected_characters=counts)


def test_wrong_number_of_characters_is_caught_before_decoding(data, cache, monkeypatch):
    root, _ = data
    monkeypatch.setattr(omniglot, "_decode_png", lambda *a: pytest.fail("decoded a zip with the wrong counts"))
    with pytest.raises(OmniglotDataError, match="holds 7 characters, expected 964.*--download"):
        load_omniglot(root, cache)  # the official counts


def test_wrong_number_of_characters_is_caught_on_a_cache_hit_too(data, cache):
    root, _ = data
    load_omniglot(root, cache, expected_characters=None)
    with pytest.raises(OmniglotDataError, match="store holds 12 characters, expected 1623"):
        load_omniglot(root, cache)


def test_unwritable_cache_names_the_setting_to_change(data, tmp_path):
    root, counts = data
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OSError, match="cannot write the Omniglot cache .* point FASTMAML_CACHE"):
        load_omniglot(root, tmp_path / "a-file" / "cache", expected_characters=counts)


def test_wrong_number_of_drawings_is_a_clear_error(tmp_path, cache):
    counts = make_omniglot_zips(tmp_path / "data", drawings=19)
    with pytest.raises(OmniglotDataError, match="has 19 drawings, expected 20"):
        load_omniglot(tmp_path / "data", cache, expected_characters=counts)


def test_entry_outside_the_official_layout_is_a_clear_error(data, cache):
    root, counts = data
    with zipfile.ZipFile(root / "images_background.zip", "a") as archive:
        archive.writestr("images_background/stray.png", png_bytes(0))
    with pytest.raises(OmniglotDataError, match="stray.png.*is not at <set>/<Alphabet>/<character>"):
        load_omniglot(root, cache, expected_characters=counts)


# --- splits and task sources ------------------------------------------------------------------


def test_official_splits_have_the_papers_sizes_and_are_disjoint():
    splits = omniglot_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 1100, "val": 100, "test": 423}
    together = torch.cat(list(splits.values()))
    assert torch.equal(together.sort().values, torch.arange(1623))
    # the original code's procedure, spelled out: random.seed(1); random.shuffle(folders)
    random.seed(1)
    order = list(range(1623))
    random.shuffle(order)
    assert splits["train"].tolist() == order[:1100] and splits["test"].tolist() == order[1200:]


def test_splits_are_deterministic_and_scale_to_small_stores():
    small = omniglot_splits(12, num_train=6, num_val=2)
    again = omniglot_splits(12, num_train=6, num_val=2)
    assert all(torch.equal(small[name], again[name]) for name in small)
    assert [len(v) for v in small.values()] == [6, 2, 4]
    assert len(set(torch.cat(list(small.values())).tolist())) == 12
    assert not torch.equal(omniglot_splits(12, 6, 2, seed=2)["train"], small["train"])
    with pytest.raises(ValueError, match="non-empty test split"):
        omniglot_splits(12, num_train=10, num_val=2)


@pytest.mark.parametrize("rotation", ["none", "classes", "per_task"], ids=lambda r: f"rotation={r}")
def test_task_sources_only_draw_classes_of_their_split(store, rotation):
    splits = omniglot_splits(CLASSES, num_train=6, num_val=2)
    generator = torch.Generator().manual_seed(0)
    seen = {}
    for split in ("train", "val", "test"):
        tasks = omniglot_tasks(store, split, 2, 1, 2, rotation=rotation, num_train=6, num_val=2)
        assert tasks.num_classes == len(splits[split]) * (4 if rotation == "classes" else 1)
        episode = tasks.sample(50, generator)
        images = torch.cat([episode.support_x, episode.query_x], dim=1).flatten(0, 1)
        codes = [read_code((255 * image[0]).round().numpy())[0] for image in images]
        seen[split] = {code // DRAWINGS for code in codes}
        assert seen[split] <= set(splits[split].tolist())
    assert not (seen["train"] & seen["val"] or seen["train"] & seen["test"] or seen["val"] & seen["test"])


def test_max_classes_keeps_the_first_classes_of_the_split(store):
    tasks = omniglot_tasks(store, "train", 2, 1, 1, num_train=6, num_val=2, max_classes=3)
    assert tasks.classes.tolist() == omniglot_splits(CLASSES, 6, 2)["train"][:3].tolist()


def test_build_omniglot_tasks_reads_the_task_config(monkeypatch, tmp_path):
    calls = []

    def fake_load(root, cache_dir=None):
        calls.append((root, cache_dir))
        return torch.zeros(1623, DRAWINGS, 28, 28, dtype=torch.uint8)

    monkeypatch.setattr(omniglot, "load_omniglot", fake_load)
    config = TaskConfig(name="omniglot", ways=5, rotation="classes", data_root="/d", cache_dir="", max_classes=30)
    train = build_omniglot_tasks(config, "train", shots=1, queries=2, device="cpu")
    val = build_omniglot_tasks(config, "val", shots=3, queries=4, device="cpu")
    assert calls == [("/d", None), ("/d", None)]
    assert (train.num_classes, train.ways, train.shots, train.queries, train.rotation) == (120, 5, 1, 2, "classes")
    assert (val.num_classes, val.shots, val.queries) == (400, 3, 4)


# --- download ---------------------------------------------------------------------------------


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, format, *args):  # keep test output clean
        pass

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch) -> Iterator[tuple[str, list[str], dict[str, str]]]:
    """An HTTP server on 127.0.0.1 serving the fixture zips: (base url, request log, md5s)."""
    for name in ("no_proxy", "NO_PROXY"):  # never route the local server through a proxy
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    served = tmp_path / "served"
    make_omniglot_zips(served / "python")
    md5 = {
        p.name: hashlib.md5(p.read_bytes(), usedforsecurity=False).hexdigest() for p in (served / "python").iterdir()
    }
    requests: list[str] = []
    handler = type("Handler", (CountingHandler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/python", requests, md5
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_download_fetches_verifies_and_skips_verified_files(server, tmp_path, cache):
    url, requests, md5 = server
    paths = download_omniglot(tmp_path / "dl", base_url=url, checksums=md5)
    assert [p.name for p in paths] == ["images_background.zip", "images_evaluation.zip"]
    assert [hashlib.md5(p.read_bytes(), usedforsecurity=False).hexdigest() for p in paths] == [
        md5[p.name] for p in paths
    ]
    assert len(requests) == 2
    download_omniglot(tmp_path / "dl", base_url=url, checksums=md5)
    assert len(requests) == 2  # both already verified
    paths[1].write_bytes(b"damaged")
    download_omniglot(tmp_path / "dl", base_url=url, checksums=md5)
    assert requests[2:] == ["/python/images_evaluation.zip"]
    assert load_omniglot(tmp_path / "dl", cache, expected_characters=None).shape[0] == CLASSES


def test_download_checksum_mismatch_saves_nothing(server, tmp_path):
    url, _, md5 = server
    wrong = {**md5, "images_background.zip": "0" * 32}
    with pytest.raises(OmniglotDataError, match="has md5 [0-9a-f]{32}, expected 0{32}; the file was not saved"):
        download_omniglot(tmp_path / "dl", base_url=url, checksums=wrong)
    assert os.listdir(tmp_path / "dl") == []


def test_download_reports_an_unreachable_file(server, tmp_path):
    url, _, md5 = server
    with pytest.raises(OmniglotDataError, match="could not download .*/missing/images_background.zip.*404"):
        download_omniglot(tmp_path / "dl", base_url=url.replace("/python", "/missing"), checksums=md5)
    only_one = {"images_background.zip": md5["images_background.zip"]}
    with pytest.raises(ValueError, match="checksums has no md5 for images_evaluation.zip"):
        download_omniglot(tmp_path / "dl2", base_url=url, checksums=only_one)
    assert not (tmp_path / "dl2").exists()  # checked before anything is fetched


# --- the real zips (skipped where the shared data folder is absent) ---------------------------

REAL = shared_omniglot_dir()
needs_real = pytest.mark.skipif(REAL is None, reason="real Omniglot zips not found (set FASTMAML_DATA)")


@needs_real
def test_real_zips_have_the_official_counts():
    names = omniglot_characters(REAL)  # checks 964 + 659 characters and 20 drawings each
    assert len(names) == 1623 and len(set(names)) == 1623
    assert names[0] == "images_background/Alphabet_of_the_Magi/character01"
    assert names[964] == "images_evaluation/Angelic/character01"
    assert len({name.split("/")[1] for name in names}) == 50


@pytest.fixture(scope="module")
def real_store(real_omniglot_cache) -> tuple[torch.Tensor, Path, float]:
    """The full decode, done once per session into a temporary cache: (store, cache dir, seconds)."""
    cache = real_omniglot_cache
    start = time.perf_counter()
    store = load_omniglot(REAL, cache)
    return store, cache, time.perf_counter() - start


@needs_real
def test_real_decode_and_cached_reload(real_store):
    store, cache, seconds = real_store
    assert store.shape == (1623, 20, 28, 28) and store.dtype == torch.uint8
    assert store.float().mean() < 40  # mostly dark background, bright strokes
    assert (store[:, :, 0, :] == 0).float().mean() > 0.95  # paper at the top edge
    entry = "images_background/Alphabet_of_the_Magi/character01/0709_01.png"
    assert np.array_equal(store[0, 0].numpy(), pil_oracle(REAL / "images_background.zip", entry, antialias=True))
    start = time.perf_counter()
    again = load_omniglot(REAL, cache)
    assert time.perf_counter() - start < 1.0 and torch.equal(again, store)
    print(f"real Omniglot: decode {seconds:.1f} s, cached load {time.perf_counter() - start:.2f} s")


@needs_real
def test_real_task_sources_cover_the_three_splits(real_store):
    store = real_store[0]
    sizes = {s: omniglot_tasks(store, s, 20, 1, 19, rotation="classes").num_classes for s in ("train", "val", "test")}
    assert sizes == {"train": 4400, "val": 400, "test": 1692}
    episode = omniglot_tasks(store, "test", 5, 1, 15).sample(2, torch.Generator().manual_seed(0))
    assert episode.shapes() == {
        "support_x": (2, 5, 1, 28, 28),
        "support_y": (2, 5),
        "query_x": (2, 75, 1, 28, 28),
        "query_y": (2, 75),
    }
