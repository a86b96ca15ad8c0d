"""Fixed evaluation episodes: saved files, Lake et al.'s one-shot runs, and scoring a learner on them."""

from __future__ import annotations

import doctest
import zipfile
from pathlib import Path

import pytest
import torch
from omniglot_fixture import lake_runs_zip, make_lake_runs, png_bytes, read_lake_code, shared_omniglot_dir
from torch import nn

from fastmaml import fixed_episodes
from fastmaml.episode import Episode
from fastmaml.fixed_episodes import (
    EpisodesFileError,
    EpisodesNotFoundError,
    episodes_digest,
    evaluate_fixed,
    load_episodes,
    load_lake_runs,
    save_episodes,
)
from fastmaml.learners import MAML
from fastmaml.tasks.episodes import EpisodeSampler
from fastmaml.tasks.omniglot import OmniglotDataError, OmniglotNotFoundError, decode_drawing, load_omniglot

META = {"run": "runs/maml", "split": "test", "shots": 1, "seed": 7, "ways": [5], "note": None}


def image_episodes() -> list[Episode]:
    """Two meta-batches as the Omniglot sampler makes them (pixels k/255), the last one smaller."""
    store = torch.randint(0, 256, (12, 6, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    sampler = EpisodeSampler(store, ways=5, shots=1, queries=3, rotation="per_task")
    generator = torch.Generator().manual_seed(0)
    return [sampler.sample(4, generator), sampler.sample(2, generator)]


def regression_episode() -> Episode:
    """Floats that are not k/255 (sinusoid-like), in float64, and targets with a trailing dim."""
    x = torch.linspace(-5, 5, 2 * 10, dtype=torch.float64).reshape(2, 10, 1)
    return Episode(x[:, :4], torch.sin(x[:, :4]), x[:, 4:], torch.sin(x[:, 4:]))


def assert_same(a: list[Episode], b: list[Episode]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("support_x", "support_y", "query_x", "query_y"):
            got, want = getattr(x, name), getattr(y, name)
            assert got.dtype == want.dtype and torch.equal(got, want), name


# --- episodes files ---------------------------------------------------------------------------


def test_module_example_runs():
    result = doctest.testmod(fixed_episodes, verbose=False)
    assert result.attempted >= 5 and result.failed == 0


def test_round_trip_is_bit_exact_and_keeps_meta(tmp_path):
    episodes = [*image_episodes(), regression_episode()]
    path = tmp_path / "eps" / "test.pt"
    save_episodes(path, episodes, META)
    loaded, meta = load_episodes(path)
    assert_same(loaded, episodes)
    assert meta == {**META, "sha256": episodes_digest(episodes)} and len(meta["sha256"]) == 64
    assert [p.name for p in path.parent.iterdir()] == ["test.pt"]  # no temp file left behind


def test_file_loads_with_weights_only_and_stores_pixels_as_uint8(tmp_path):
    path = tmp_path / "test.pt"
    save_episodes(path, image_episodes()[:1], META)
    raw = torch.load(path, weights_only=True)
    fields = raw["episodes"][0]
    assert fields["support_x"]["data"].dtype == torch.uint8 and fields["support_x"]["over255"]
    assert fields["support_y"]["data"].dtype == torch.int64 and not fields["support_y"]["over255"]
    regression = tmp_path / "reg.pt"
    save_episodes(regression, [regression_episode()], {})
    assert torch.load(regression, weights_only=True)["episodes"][0]["query_x"]["data"].dtype == torch.float64


def test_digest_names_the_task_set():
    a, b = image_episodes()
    assert episodes_digest([a, b]) == episodes_digest(image_episodes())
    assert episodes_digest([a]) != episodes_digest([a, b])
    changed = Episode(a.support_x, a.support_y, a.query_x, a.query_y.flip(-1))
    assert episodes_digest([changed, b]) != episodes_digest([a, b])


def test_missing_file_is_a_file_not_found_error_with_the_fix(tmp_path):
    with pytest.raises(EpisodesNotFoundError, match=r"nowhere.pt does not exist; write it with `fastmaml episodes"):
        load_episodes(tmp_path / "nowhere.pt")
    assert issubclass(EpisodesNotFoundError, FileNotFoundError)


def corrupt_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_flip_pixels(path: Path) -> None:
    """Flip bytes inside the stored tensor data: the zip/pickle still load, only the sha256 can tell."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = (int.from_bytes(raw[info.header_offset + i : info.header_offset + i + 2], "little")
                                 for i in (26, 28))  # the local header's own lengths
    start = info.header_offset + 30 + name_length + extra_length + 16
    raw[start : start + 4] = bytes(b ^ 0x5A for b in raw[start : start + 4])
    path.write_bytes(bytes(raw))


def corrupt_not_torch(path: Path) -> None:
    path.write_text("run,accuracy\nmaml,0.98\n")


def corrupt_other_torch_file(path: Path) -> None:
    torch.save({"learner": {"w": torch.zeros(2)}, "step": 3}, path)


def corrupt_newer_version(path: Path) -> None:
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "version": 99}, path)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (corrupt_truncated, "is unreadable .* truncated or not an episodes file"),
        (corrupt_flip_pixels, "fails its sha256 check: it was damaged"),
        (corrupt_not_torch, "is unreadable"),
        (corrupt_other_torch_file, "is not a fastmaml episodes file"),
        (corrupt_newer_version, "is episodes format version 99; this fastmaml reads version 1"),
    ],
    ids=["truncated", "flipped-pixels", "csv", "checkpoint", "newer-version"],
)
def test_damaged_or_wrong_file_is_a_clear_error(tmp_path, corrupt, message):
    path = tmp_path / "test.pt"
    save_episodes(path, image_episodes(), META)
    corrupt(path)
    with pytest.raises(EpisodesFileError, match=message) as info:
        load_episodes(path)
    assert str(path) in str(info.value) and "fastmaml episodes RUN_DIR --out" in str(info.value)


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"data": Path("/data")}, "meta must hold plain values"),
        ({"sha256": "x"}, "'sha256' is reserved"),
        ({1: "x"}, "str keys"),
    ],
    ids=["path-value", "reserved-key", "int-key"],
)
def test_bad_meta_is_refused_before_writing(tmp_path, meta, message):
    with pytest.raises(ValueError, match=message):
        save_episodes(tmp_path / "test.pt", image_episodes(), meta)
    assert not (tmp_path / "test.pt").exists()


def test_no_episodes_is_refused(tmp_path):
    with pytest.raises(ValueError, match="non-empty list of Episode"):
        save_episodes(tmp_path / "test.pt", [], META)


# --- Lake et al.'s one-shot runs --------------------------------------------------------------


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "folder"])
def test_lake_runs_label_each_item_with_its_training_class(tmp_path, as_zip):
    path = tmp_path / ("all_runs.zip" if as_zip else "all_runs")
    truth = make_lake_runs(path, runs=3, as_zip=as_zip)
    runs = load_lake_runs(path)
    assert [name for name, _ in runs] == ["run01", "run02", "run03"]
    for r, (name, episode) in enumerate(runs, 1):
        assert episode.shapes() == {"support_x": (1, 20, 1, 28, 28), "support_y": (1, 20),
                                    "query_x": (1, 20, 1, 28, 28), "query_y": (1, 20)}
        assert episode.support_x.dtype == torch.float32 and episode.support_y.tolist() == [list(range(20))]
        support = [read_lake_code((x[0] * 255).round().numpy()) for x in episode.support_x[0]]
        query = [read_lake_code((x[0] * 255).round().numpy()) for x in episode.query_x[0]]
        assert support == [(r, k, False) for k in range(20)]  # classKK.png is label KK-1
        assert query == [(r, k, True) for k in truth[name]]  # items in order, each drawing its true class
        assert episode.query_y[0].tolist() == truth[name]


def test_lake_images_get_the_omniglot_store_preprocessing(tmp_path):
    make_lake_runs(tmp_path / "all_runs.zip", runs=1)
    (_, episode), = load_lake_runs(tmp_path / "all_runs.zip")
    with zipfile.ZipFile(tmp_path / "all_runs.zip") as archive:
        drawing = decode_drawing(archive.read("run01/training/class05.png"), "class05")
    assert torch.equal(episode.support_x[0, 4, 0], torch.from_numpy(drawing).float() / 255)
    assert episode.support_x.max() == 1 and episode.support_x.mean() < 0.6  # bright strokes on a dark background


def test_lake_runs_may_sit_in_a_top_folder_of_the_zip(tmp_path):
    make_lake_runs(tmp_path / "flat.zip", runs=1)
    with zipfile.ZipFile(tmp_path / "flat.zip") as flat, zipfile.ZipFile(tmp_path / "nested.zip", "w") as nested:
        for info in flat.infolist():
            nested.writestr(f"all_runs/{info.filename}", flat.read(info))
    (name, nested_run), = load_lake_runs(tmp_path / "nested.zip")
    (_, flat_run), = load_lake_runs(tmp_path / "flat.zip")
    assert name == "run01" and torch.equal(nested_run.query_y, flat_run.query_y)
    assert torch.equal(nested_run.query_x, flat_run.query_x)


def rewrite_labels(folder: Path, edit) -> Path:
    labels = folder / "run01" / "class_labels.txt"
    labels.write_text(edit(labels.read_text().splitlines()))
    return labels


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda lines: "\n".join([lines[0].replace(" ", "\t", 1) + " extra", *lines[1:]]),
         r"class_labels.txt:1: .*expected 'run01/test/itemMM.png run01/training/classKK.png'"),
        (lambda lines: "\n".join([*lines[:2], lines[2].split()[0] + " run01/training/class99.png", *lines[3:]]),
         r"class_labels.txt:3: .*run01/training/class99.png does not exist"),
        (lambda lines: "\n".join([*lines, lines[0]]), r"class_labels.txt:21: .* is labelled twice"),
        (lambda lines: "\n".join(lines[1:]), r"class_labels.txt has no line for run01/test/item"),
    ],
    ids=["malformed-line", "missing-class-file", "duplicate-item", "unlabelled-item"],
)
def test_lake_label_errors_name_the_file_and_line(tmp_path, edit, message):
    make_lake_runs(tmp_path / "runs", runs=1, as_zip=False)
    rewrite_labels(tmp_path / "runs", edit)
    with pytest.raises(OmniglotDataError, match=message) as info:
        load_lake_runs(tmp_path / "runs")
    assert "re-extract Lake's all_runs.zip" in str(info.value)


def test_lake_missing_test_item_file_names_the_line(tmp_path):
    make_lake_runs(tmp_path / "runs", runs=1, as_zip=False)
    (tmp_path / "runs" / "run01" / "test" / "item07.png").unlink()
    with pytest.raises(OmniglotDataError, match=r"class_labels.txt:\d+: 'run01/test/item07.png .*item07.png does not"):
        load_lake_runs(tmp_path / "runs")


def test_lake_undecodable_drawing_names_the_file(tmp_path):
    make_lake_runs(tmp_path / "runs", runs=1, as_zip=False)
    (tmp_path / "runs" / "run01" / "training" / "class03.png").write_bytes(png_bytes(1)[:40])
    with pytest.raises(OmniglotDataError, match=r"run01/training/class03.png is not a decodable PNG"):
        load_lake_runs(tmp_path / "runs")


def test_lake_wrong_place_is_a_clear_error(tmp_path):
    with pytest.raises(OmniglotNotFoundError, match="does not exist; give Lake's all_runs.zip"):
        load_lake_runs(tmp_path / "all_runs.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OmniglotDataError, match="holds no runNN/class_labels.txt"):
        load_lake_runs(tmp_path / "empty")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(OmniglotDataError, match="bad.zip is not a readable zip"):
        load_lake_runs(tmp_path / "bad.zip")


# --- evaluate_fixed ---------------------------------------------------------------------------


def linear_learner() -> MAML:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 20))
    return MAML(model, inner_lr=0.5, inner_steps=1, loss="cross_entropy")


def test_evaluate_fixed_scores_lake_runs_like_lakes_demo(tmp_path):
    make_lake_runs(tmp_path / "all_runs.zip", runs=3)
    runs = load_lake_runs(tmp_path / "all_runs.zip")
    learner = linear_learner()
    result = evaluate_fixed(learner, runs, steps=2)
    assert result["loss"].shape == result["accuracy"].shape == (3, 3)
    errors = []
    for row, (name, episode) in enumerate(runs):
        with torch.no_grad():  # oracle for step 0: the unadapted model's own predictions
            predicted = learner.model(episode.query_x[0]).argmax(-1)
        correct = int((predicted == episode.query_y[0]).sum())
        assert result["accuracy"][row, 0].item() == pytest.approx(correct / 20)
        assert result["runs"][name][0] == pytest.approx(correct / 20)
        errors.append(100 - 100 * correct / 20)  # demo_classification.py: perror per run, then the mean
    assert result["error_rate_percent"][0] == pytest.approx(sum(errors) / 3)
    assert result["error_rate_percent"][2] < result["error_rate_percent"][0]  # adapting on the support set helps


def test_evaluate_fixed_on_a_saved_file_matches_the_learner(tmp_path):
    make_lake_runs(tmp_path / "all_runs.zip", runs=2)
    episodes = [episode for _, episode in load_lake_runs(tmp_path / "all_runs.zip")]
    save_episodes(tmp_path / "lake.pt", episodes, {"source": "lake"})
    loaded, _ = load_episodes(tmp_path / "lake.pt")
    learner = linear_learner()
    result = evaluate_fixed(learner, loaded, steps=1)
    assert "runs" not in result and result["steps"] == 1
    for row, episode in enumerate(episodes):
        loss, accuracy = learner.evaluate(episode, 1)
        assert torch.equal(result["loss"][row], loss[0]) and torch.equal(result["accuracy"][row], accuracy[0])


def test_evaluate_fixed_refuses_a_mix_of_named_and_plain_episodes():
    a, b = image_episodes()
    with pytest.raises(ValueError, match="not a mix"):
        evaluate_fixed(linear_learner(), [("run01", a), b], steps=1)


# --- the published runs, when present ---------------------------------------------------------

LAKE = lake_runs_zip()
REAL = shared_omniglot_dir()


@pytest.mark.skipif(LAKE is None or REAL is None, reason="Lake's all_runs.zip or the real zips not found "
                    "(set FASTMAML_LAKE_RUNS to all_runs.zip)")
def test_real_lake_runs_are_evaluation_drawings_of_their_labelled_class(real_omniglot_cache):
    """The published runs: 20 runs of 20-way 1-shot whose pixels are store drawings, each item of its class."""
    runs = load_lake_runs(LAKE)
    assert [name for name, _ in runs] == [f"run{r:02d}" for r in range(1, 21)]
    store = load_omniglot(REAL, real_omniglot_cache)
    where = {image.numpy().tobytes(): c for c, drawings in enumerate(store) for image in drawings}
    for _, episode in runs:
        support = [where[(x[0] * 255).round().to(torch.uint8).numpy().tobytes()] for x in episode.support_x[0]]
        query = [where[(x[0] * 255).round().to(torch.uint8).numpy().tobytes()] for x in episode.query_x[0]]
        assert min(support + query) >= 964  # all from images_evaluation
        assert query == [support[y] for y in episode.query_y[0].tolist()]
