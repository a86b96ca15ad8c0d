"""EpisodeSampler: what each episode contains, checked by identifying every image it holds.

The store is random uint8 noise, so every (class, example, quarter turn) image is distinct and
``identify`` can name the source of any episode image by brute-force comparison against all
``torch.rot90`` copies: an oracle that shares no code with the sampler.
"""

from __future__ import annotations

import pytest
import torch

from fastmaml.tasks.episodes import ROTATIONS, EpisodeSampler

CLASSES, EXAMPLES, SIZE = 10, 6, 5


def make_store(channels: int | None = None, classes: int = CLASSES, examples: int = EXAMPLES) -> torch.Tensor:
    shape = (classes, examples) + ((channels,) if channels else ()) + (SIZE, SIZE)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(7))


def candidates(store: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Every rotated image of the store as floats, and its (class, example, quarter turns)."""
    images = store if store.dim() == 5 else store.unsqueeze(2)
    table, names = [], []
    for c in range(images.shape[0]):
        for e in range(images.shape[1]):
            for k in range(4):
                table.append(torch.rot90(images[c, e], k, dims=(-2, -1)).float() / 255)
                names.append((c, e, k))
    table = torch.stack(table)
    assert len(torch.unique(table.flatten(1), dim=0)) == len(names), "store images must be distinguishable"
    return table, names


def identify(x: torch.Tensor, table: torch.Tensor, names: list[tuple[int, int, int]]) -> list[list[tuple]]:
    """``[T][n]`` -> (class, example, quarter turns) of every image in ``x [T, n, C, H, W]``."""
    match = (x.unsqueeze(2) == table).flatten(3).all(-1)  # [T, n, candidates]
    assert (match.sum(-1) == 1).all(), "every episode image must be exactly one store image"
    return [[names[i] for i in row] for row in match.int().argmax(-1).tolist()]


def check_episode(sampler: EpisodeSampler, store: torch.Tensor, num_tasks: int, seed: int) -> list[dict]:
    """Assert the episode invariants; returns per task {label: (class, rotation)} for further checks."""
    table, names = candidates(store)
    episode = sampler.sample(num_tasks, torch.Generator().manual_seed(seed)).to("cpu")
    N, K, Q = sampler.ways, sampler.shots, sampler.queries
    support, query = identify(episode.support_x, table, names), identify(episode.query_x, table, names)
    mappings = []
    for t in range(num_tasks):
        sy, qy = episode.support_y[t].tolist(), episode.query_y[t].tolist()
        assert sorted(set(sy)) == list(range(N)) and all(sy.count(label) == K for label in range(N))
        assert sorted(set(qy)) == list(range(N)) and all(qy.count(label) == Q for label in range(N))
        # in "classes" mode a rotated copy is another class's image, so the image is (class, example, turns)
        image = (lambda c, e, k: (c, e, k)) if sampler.rotation == "classes" else (lambda c, e, k: (c, e))
        drawn = {image(*source) for source in support[t] + query[t]}
        assert len(drawn) == N * (K + Q), "an image was used twice (support/query overlap or a repeat)"
        mapping: dict[int, set[tuple[int, int]]] = {}
        for label, (c, _, k) in zip(sy + qy, support[t] + query[t], strict=True):
            mapping.setdefault(label, set()).add((c, k))
        assert all(len(v) == 1 for v in mapping.values()), "a label mixes classes or rotations"
        classes = [next(iter(v)) for v in mapping.values()]
        key = (lambda ck: ck) if sampler.rotation == "classes" else (lambda ck: ck[0])
        assert len({key(ck) for ck in classes}) == N, "a class appears twice in one task"
        mappings.append({label: next(iter(v)) for label, v in mapping.items()})
    return mappings


@pytest.mark.parametrize("rotation", ROTATIONS, ids=lambda r: f"rotation={r}")
@pytest.mark.parametrize(
    "ways,shots,queries", [(5, 1, 5), (3, 2, 4), (10, 1, 1)], ids=["5way-1shot-5q", "3way-2shot-4q", "10way-1shot-1q"]
)
def test_episode_invariants(rotation, ways, shots, queries):
    store = make_store()
    sampler = EpisodeSampler(store, ways, shots, queries, rotation=rotation)
    mappings = check_episode(sampler, store, num_tasks=8, seed=0)
    rotations = {k for m in mappings for _, k in m.values()}
    assert rotations == ({0} if rotation == "none" else {0, 1, 2, 3})


@pytest.mark.parametrize("channels", [None, 3], ids=["store=[K,E,H,W]", "store=[K,E,C,H,W]"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: f"dtype={d}")
def test_shapes_dtypes_and_range(channels, dtype):
    sampler = EpisodeSampler(make_store(channels), ways=4, shots=2, queries=3, dtype=dtype)
    episode = sampler.sample(5, torch.Generator().manual_seed(0))
    C = channels or 1
    assert episode.shapes() == {
        "support_x": (5, 8, C, SIZE, SIZE),
        "support_y": (5, 8),
        "query_x": (5, 12, C, SIZE, SIZE),
        "query_y": (5, 12),
    }
    assert episode.support_x.dtype == dtype and episode.support_y.dtype == torch.int64
    assert 0 <= episode.query_x.min() and episode.query_x.max() <= 1


def test_pixels_equal_the_rotated_store_images_the_indices_name():
    store = make_store(channels=2)
    sampler = EpisodeSampler(store, ways=3, shots=2, queries=2, rotation="per_task")
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    indices = sampler.sample_indices(4, generator)
    generator.set_state(state)
    episode = sampler.sample(4, generator)
    for t in range(4):
        for n in range(3):
            c, k, label = (int(v[t, n]) for v in (indices.classes, indices.rotations, indices.labels))
            for j, e in enumerate(indices.examples[t, n].tolist()):
                expected = torch.rot90(store[c, e], k, dims=(-2, -1)).float() / 255
                x, y = (episode.support_x, episode.support_y) if j < 2 else (episode.query_x, episode.query_y)
                i = n * 2 + j % 2
                assert torch.equal(x[t, i], expected) and int(y[t, i]) == label


def test_per_task_rotation_gives_a_class_one_rotation_in_a_task_and_classes_mode_quadruples():
    store = make_store()
    per_task = EpisodeSampler(store, 5, 1, 1, rotation="per_task")
    classes = EpisodeSampler(store, 5, 1, 1, rotation="classes")
    assert (per_task.num_classes, classes.num_classes) == (CLASSES, 4 * CLASSES)
    # 20 ways from 10 classes only works when rotations count as classes
    many = EpisodeSampler(store, 20, 1, 1, rotation="classes")
    mapping = check_episode(many, store, num_tasks=3, seed=1)
    assert all(len({c for c, _ in m.values()}) < 20 for m in mapping)  # some class with two rotations
    with pytest.raises(ValueError, match="ways=20 but only 10 classes"):
        EpisodeSampler(store, 20, 1, 1, rotation="per_task")


def test_classes_restrict_the_draw():
    store = make_store()
    allowed = [7, 2, 5, 9]
    sampler = EpisodeSampler(store, 3, 1, 2, classes=allowed, rotation="classes")
    drawn = {c for m in check_episode(sampler, store, num_tasks=20, seed=2) for c, _ in m.values()}
    assert drawn == set(allowed)
    assert set(sampler.sample_indices(50, torch.Generator().manual_seed(0)).classes.unique().tolist()) == set(allowed)


def test_every_class_and_example_is_drawn_about_equally_often():
    sampler = EpisodeSampler(make_store(), ways=5, shots=1, queries=2)
    indices = sampler.sample_indices(4000, torch.Generator().manual_seed(0))
    class_counts = torch.bincount(indices.classes.flatten(), minlength=CLASSES).float()
    example_counts = torch.bincount(indices.examples.flatten(), minlength=EXAMPLES).float()
    assert (class_counts / class_counts.mean() - 1).abs().max() < 0.05  # expected 2000 each
    assert (example_counts / example_counts.mean() - 1).abs().max() < 0.05
    first_label = torch.bincount(indices.labels[:, 0], minlength=5).float()
    assert (first_label / first_label.mean() - 1).abs().max() < 0.1


def test_same_seed_same_episodes_and_state_resumes_the_stream():
    sampler = EpisodeSampler(make_store(), 5, 1, 3, rotation="per_task")
    a = sampler.sample(6, torch.Generator().manual_seed(11))
    b = sampler.sample(6, torch.Generator().manual_seed(11))
    c = sampler.sample(6, torch.Generator().manual_seed(12))
    assert torch.equal(a.query_x, b.query_x) and torch.equal(a.support_y, b.support_y)
    assert not torch.equal(a.query_x, c.query_x)
    generator = torch.Generator().manual_seed(5)
    sampler.sample(2, generator)
    state = generator.get_state()
    after = sampler.sample(2, generator)
    generator.set_state(state)
    assert torch.equal(sampler.sample(2, generator).support_x, after.support_x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
def test_sampling_on_cuda(generator_device):
    store = make_store()
    sampler = EpisodeSampler(store, 5, 1, 2, rotation="per_task", device="cuda")
    episode = sampler.sample(4, torch.Generator(generator_device).manual_seed(0))
    assert episode.support_x.device.type == "cuda" and episode.query_y.device.type == "cuda"
    assert episode.support_x.min() >= 0 and episode.support_x.max() <= 1
    check_episode(sampler, store, num_tasks=2, seed=0)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"ways": 11}, ValueError, "ways=11 but only 10 classes are available"),
        ({"shots": 4, "queries": 3}, ValueError, r"shots \+ queries = 4 \+ 3 but each class has only 6"),
        ({"ways": 0}, ValueError, "ways must be a positive integer"),
        ({"queries": 0}, ValueError, "queries must be a positive integer"),
        ({"rotation": "random"}, ValueError, "rotation must be one of none, classes, per_task"),
        ({"classes": [1, 1, 2]}, ValueError, "duplicate"),
        ({"classes": [3, 10]}, ValueError, r"classes must lie in \[0, 10\)"),
        ({"classes": [0.5]}, ValueError, "integer class ids"),
        ({"store": torch.zeros(4, 3, 5, 5)}, TypeError, r"uint8.*\(x \* 255\)"),
        ({"store": torch.zeros(4, 3, 5, dtype=torch.uint8)}, ValueError, r"\[classes, examples, H, W\]"),
        ({"store": torch.zeros(10, 6, 4, 5, dtype=torch.uint8), "rotation": "classes"}, ValueError, "square"),
    ],
    ids=[
        "ways>classes",
        "shots+queries>examples",
        "ways=0",
        "queries=0",
        "rotation=random",
        "duplicate-classes",
        "class-out-of-range",
        "float-class-ids",
        "float-store",
        "3d-store",
        "non-square-rotation",
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, error, message):
    arguments = {"store": make_store(), "ways": 5, "shots": 1, "queries": 1, **kwargs}
    with pytest.raises(error, match=message):
        EpisodeSampler(**arguments)


def test_num_tasks_must_be_positive():
    with pytest.raises(ValueError, match="num_tasks must be a positive integer"):
        EpisodeSampler(make_store(), 2, 1, 1).sample(0, torch.Generator())
