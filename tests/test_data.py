"""Embedded digits and the grain pipeline."""

import numpy as np
import pytest

from hmar_jax.training import data


def test_digits_are_real_and_balanced():
    images, labels = data.load_digits(16)
    assert images.shape == (1797, 16, 16, 3) and images.dtype == np.uint8
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    assert np.all(np.bincount(labels) >= 170)
    assert images.max() > 200 and images.min() == 0
    np.testing.assert_array_equal(images[..., 0], images[..., 2])  # grey replicated to RGB
    train, _ = data.digits_split(16, "train")
    held_out, _ = data.digits_split(16, "eval")
    assert len(train) + len(held_out) == 1797
    with pytest.raises(ValueError, match="Unknown digits split"):
        data.digits_split(16, "test")


def test_iterator_batches_reshuffles_and_resumes():
    images, labels = data.digits_split(16, "eval")
    iterator = data.batched_iterator(images, labels, batch_size=50, seed=3)
    first = next(iterator)
    assert first["image"].shape == (50, 16, 16, 3) and first["image"].dtype == np.float32
    assert -1.0 <= first["image"].min() and first["image"].max() <= 1.0
    state = iterator.get_state()
    expected = [next(iterator)["label"] for _ in range(5)]  # crosses an epoch boundary
    iterator.set_state(state)
    np.testing.assert_array_equal(np.stack(expected), np.stack([next(iterator)["label"] for _ in range(5)]))
    by_epoch = data.batched_iterator(images, labels, batch_size=197, seed=3)
    first_epoch, second_epoch = next(by_epoch)["label"], next(by_epoch)["label"]
    assert sorted(first_epoch) == sorted(second_epoch) == sorted(labels)
    assert not np.array_equal(first_epoch, second_epoch)  # a new permutation each epoch


def test_bad_datasets_are_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        data.batched_iterator(np.zeros((0, 4, 4, 3), np.uint8), np.zeros((0,), np.int32), 2, 0)
    with pytest.raises(ValueError, match="exceeds the dataset size"):
        data.batched_iterator(np.zeros((3, 4, 4, 3), np.uint8), np.zeros((3,), np.int32), 4, 0)


def _image_folder(root, sizes=((20, 30), (40, 17), (16, 16))):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_image_folder_pipeline_skips_corrupt_files(tmp_path, caplog):
    root = _image_folder(tmp_path / "images")
    (root / "dog" / "broken.jpg").write_bytes(b"not an image")
    source = data.ImageFolderSource.scan(str(root))
    assert source.classes == ("cat", "dog") and len(source) == 7
    iterator = data.image_iterator(source, image_size=16, batch_size=4, seed=0)
    batches = [next(iterator) for _ in range(3)]
    assert all(b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32 for b in batches)
    assert {int(x) for b in batches for x in b["label"]} == {0, 1}
    assert "broken.jpg" in caplog.text
    strict = data.image_iterator(source, image_size=16, batch_size=7, seed=0, skip_corrupt=False)
    with pytest.raises(ValueError, match="Unreadable image .*broken.jpg"):
        next(strict)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.ImageFolderSource.scan(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.ImageFolderSource.scan(str(tmp_path / "empty"))
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.ImageFolderSource.scan(str(tmp_path / "empty"))


def test_unreadable_image_folders_stop_in_bounded_time(tmp_path):
    """A folder none of whose images decode is refused at scan time; a source past that
    check whose images fail 100 times in a row stops the pipeline instead of spinning."""
    import time

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(20):
            (tmp_path / name / f"{i}.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"None of 16 images sampled from .* can be read \(e\.g\. "
                                         r".*cat/0\.png: cannot identify image file"):
        data.ImageFolderSource.scan(str(tmp_path))
    paths = sorted(str(p) for p in tmp_path.rglob("*.png"))
    source = data.ImageFolderSource(str(tmp_path), ("cat", "dog"), tuple(paths),
                                    tuple(int("dog" in p) for p in paths))
    iterator = data.image_iterator(source, image_size=16, batch_size=4, seed=0)
    start = time.monotonic()
    with pytest.raises(ValueError, match="100 images in a row could not be read"):
        next(iterator)
    assert time.monotonic() - start < 30
    with pytest.raises(ValueError, match=r"data\.root is empty; set --config\.data\.root="):
        data.ImageFolderSource.scan("")


def test_resize_and_crop_follows_upstream():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 40:] = 255
    center = data.resize_and_crop(image, 16, None)  # shorter side -> 18, centre crop 16
    assert center.shape == (16, 16, 3) and 0 < center.mean() < 255
    crops = {data.resize_and_crop(image, 16, np.random.default_rng(s)).mean() for s in range(8)}
    assert len(crops) > 1  # random crops differ


def test_one_dataset_dispatch_for_training_and_pretokenizing(tmp_path):
    """open_dataset serves training (endless, shuffled, the digits' own pipeline) and
    pretokenizing (every example once, in order, centre-cropped) from one data block."""
    import ml_collections

    config = ml_collections.ConfigDict(dict(
        name="digits", split="eval", image_size=16, root="", tfds_name="", data_dir="",
        num_workers=0, skip_corrupt=True))
    dataset = data.open_dataset(config)
    assert (dataset.num_classes, dataset.name) == (10, "data.name=digits")
    images, labels = data.digits_split(16, "eval")
    once = list(dataset.batches(64, train=False))
    assert [len(b["label"]) for b in once] == [64, 64, 64, 5]
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in once]), labels)
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in once]),
                                  data.to_model_range({"image": images, "label": labels})["image"])
    training, reference = dataset.batches(50, seed=3), data.batched_iterator(images, labels, 50, 3)
    for _ in range(5):
        np.testing.assert_array_equal(next(training)["image"], next(reference)["image"])

    folder = ml_collections.ConfigDict(config.to_dict() | dict(
        name="image_folder", root=str(_image_folder(tmp_path / "images"))))
    dataset = data.open_dataset(folder)
    assert dataset.num_classes == 2 and dataset.name.startswith("data.root=")
    once = list(dataset.batches(4, train=False))
    assert [len(b["label"]) for b in once] == [4, 2]
    assert np.concatenate([b["label"] for b in once]).tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="Unknown data.name 'mnist'"):
        data.open_dataset(ml_collections.ConfigDict(config.to_dict() | dict(name="mnist")))
