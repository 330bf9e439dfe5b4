"""IDX reading/writing, Fashion-MNIST discovery and the embedded fallback subset."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparsecore.datasets import (
    FASHION_MNIST_FILES,
    DatasetError,
    ImageDataset,
    load_embedded_fashion_mnist,
    load_fashion_mnist,
    read_idx,
    write_idx,
)

IDX_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


def _write_fake_fmnist(directory: Path, n_train: int, n_test: int, *, gz: bool) -> dict:
    rng = np.random.default_rng(7)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in FASHION_MNIST_FILES.items():
        write_idx(directory / (stem + (".gz" if gz else "")), arrays[key], compress=gz)
    return arrays


@settings(max_examples=30, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from(IDX_DTYPES),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6),
    ),
    compress=st.booleans(),
)
def test_idx_round_trip(tmp_path_factory, array, compress):
    path = tmp_path_factory.mktemp("idx") / "data.idx"
    write_idx(path, array, compress=compress)
    back = read_idx(path)
    assert back.dtype == array.dtype.newbyteorder("=")
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress


def test_idx_layout_is_big_endian_header_and_payload(tmp_path):
    path = tmp_path / "x"
    write_idx(path, np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32))
    raw = path.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0C, 2])
    assert raw[4:12] == (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    assert raw[12:16] == (1).to_bytes(4, "big")
    assert len(raw) == 12 + 6 * 4


def test_gzip_detected_by_content_not_name(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    gz_named_plain = tmp_path / "plain.gz"
    write_idx(gz_named_plain, data, compress=False)
    plain_named_gz = tmp_path / "compressed-idx3-ubyte"
    write_idx(plain_named_gz, data, compress=True)
    np.testing.assert_array_equal(read_idx(gz_named_plain), data)
    np.testing.assert_array_equal(read_idx(plain_named_gz), data)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_payload_names_file_and_sizes(tmp_path, compress):
    path = tmp_path / "images.idx"
    write_idx(path, np.zeros((5, 4, 4), dtype=np.uint8))
    raw = path.read_bytes()[:-10]
    path.write_bytes(gzip.compress(raw) if compress else raw)
    with pytest.raises(DatasetError, match=r"images\.idx.*truncated data.*\(5, 4, 4\).*80.*70"):
        read_idx(path)


def test_truncated_gzip_stream(tmp_path):
    path = tmp_path / "cut.gz"
    write_idx(path, np.arange(1000, dtype=np.int32), compress=True)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DatasetError, match=r"cut\.gz.*gzip"):
        read_idx(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"too short"),
        (b"\x00\x00", r"too short"),
        (b"PK\x03\x04rest", r"not an IDX file"),
        (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]), r"unknown IDX type code 0x07"),
        (bytes([0, 0, 0x08, 0]), r"0 dimensions"),
        (bytes([0, 0, 0x08, 3, 0, 0, 0, 1]), r"truncated header"),
        (bytes([0, 0, 0x08, 1, 0, 0, 0, 2, 1, 2, 3]), r"1 unexpected bytes"),
        # dimensions whose product overflows 64 bits (it used to wrap around)
        (bytes([0, 0, 0x0E, 3]) + b"\xff" * 12 + b"\x00" * 8, r"needs 633825299\d+ bytes"),
        (bytes([0, 0, 0x08, 2]) + b"\x00\x01\x00\x00" * 2 + b"\x00" * 4, r"truncated data"),
    ],
)
def test_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad-file"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=message) as info:
        read_idx(path)
    assert "bad-file" in str(info.value)


def test_train_and_test_images_of_different_sizes_are_refused():
    sub = load_embedded_fashion_mnist()
    with pytest.raises(DatasetError, match=r"train images are 28x28 pixels but test images 32x32"):
        ImageDataset(
            "x",
            "here",
            sub.train_images[:5],
            sub.train_labels[:5],
            np.zeros((5, 32, 32), np.uint8),
            sub.test_labels[:5],
        )


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        read_idx(tmp_path / "nope")


def test_write_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


@pytest.mark.parametrize("gz", [False, True])
def test_load_from_explicit_directory(tmp_path, gz):
    arrays = _write_fake_fmnist(tmp_path / "fm", 30, 12, gz=gz)
    ds = load_fashion_mnist(tmp_path / "fm")
    assert ds.name == "fashion-mnist"
    assert ds.source == str(tmp_path / "fm")
    assert ds.train_images.dtype == np.uint8 and ds.train_images.shape == (30, 28, 28)
    assert ds.train_labels.dtype == np.int64 and ds.test_labels.dtype == np.int64
    np.testing.assert_array_equal(ds.test_images, arrays["test_images"])
    np.testing.assert_array_equal(ds.train_labels, arrays["train_labels"])
    info = ds.describe()
    assert (info["train_size"], info["test_size"], info["image_shape"]) == (30, 12, [28, 28])


def test_explicit_directory_missing_file_is_an_error_not_a_fallback(tmp_path):
    _write_fake_fmnist(tmp_path / "fm", 10, 5, gz=True)
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte"):
        load_fashion_mnist(tmp_path / "fm")
    with pytest.raises(DatasetError, match="not a directory"):
        load_fashion_mnist(tmp_path / "does-not-exist")


def test_label_count_mismatch(tmp_path):
    _write_fake_fmnist(tmp_path / "fm", 10, 5, gz=False)
    write_idx(tmp_path / "fm" / "train-labels-idx1-ubyte", np.zeros(9, dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"train-labels.*do not match 10 images"):
        load_fashion_mnist(tmp_path / "fm")


def test_search_dirs_first_complete_one_wins(tmp_path):
    _write_fake_fmnist(tmp_path / "incomplete", 4, 4, gz=False)
    (tmp_path / "incomplete" / "train-images-idx3-ubyte").unlink()
    _write_fake_fmnist(tmp_path / "good", 8, 3, gz=True)
    ds = load_fashion_mnist(
        search_dirs=(tmp_path / "nothing", tmp_path / "incomplete", tmp_path / "good")
    )
    assert ds.source == str(tmp_path / "good")
    assert ds.train_images.shape[0] == 8


def test_fallback_to_embedded_when_nothing_installed(tmp_path):
    ds = load_fashion_mnist(search_dirs=(tmp_path / "absent",))
    assert ds.name == "fashion-mnist-subset"
    assert ds.source.startswith("embedded:")
    with pytest.raises(DatasetError, match="fallback is disabled"):
        load_fashion_mnist(search_dirs=(tmp_path / "absent",), allow_embedded=False)


def test_embedded_subset_shape_balance_and_content():
    ds = load_embedded_fashion_mnist()
    assert ds.train_images.shape == (6000, 28, 28) and ds.test_images.shape == (1000, 28, 28)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(ds.train_labels, minlength=10), [600] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_labels, minlength=10), [100] * 10)
    # Real images, not noise: distinct, using the full range, mostly dark background.
    assert len({img.tobytes() for img in ds.train_images[:500]}) == 500
    assert ds.train_images.max() == 255 and ds.train_images.min() == 0
    assert 0.3 < (ds.train_images == 0).mean() < 0.7
    # Trousers (1) are narrower than pullovers (2): mean ink per image differs in the known way.
    ink = [ds.train_images[ds.train_labels == c].mean() for c in range(10)]
    assert ink[1] < ink[2]
    info = ds.describe()
    assert info["license"].startswith("MIT") and info["train_size"] == 6000


def test_embedded_subset_matches_installed_fashion_mnist():
    """Every embedded image is the real one at its recorded index in the full dataset.

    Where Debian's full copy is not installed, only the recorded indices are checked.
    """
    from importlib import resources

    with (resources.files("sparsecore") / "data" / "fashion_mnist_subset.npz").open("rb") as f:
        npz = np.load(f)
        train_index, test_index = npz["train_index"], npz["test_index"]
    assert np.all(np.diff(train_index) > 0) and np.all(np.diff(test_index) > 0)
    assert 0 <= train_index[0] and train_index[-1] < 60000
    assert 0 <= test_index[0] and test_index[-1] < 10000
    sub = load_embedded_fashion_mnist()
    full_dir = Path("/usr/share/datasets/fashion-mnist")
    if full_dir.is_dir():
        full = load_fashion_mnist(full_dir)
        np.testing.assert_array_equal(sub.train_images, full.train_images[train_index])
        np.testing.assert_array_equal(sub.train_labels, full.train_labels[train_index])
        np.testing.assert_array_equal(sub.test_images, full.test_images[test_index])
        np.testing.assert_array_equal(sub.test_labels, full.test_labels[test_index])


def test_subset_and_validation():
    ds = load_embedded_fashion_mnist()
    small = ds.subset(limit_train=50, limit_test=20)
    assert small.train_images.shape[0] == 50 and small.test_labels.shape[0] == 20
    assert small.describe()["limited_from"] == {"train_size": 6000, "test_size": 1000}
    with pytest.raises(ValueError, match=r"limit_train.*0"):
        ds.subset(limit_train=0)
    with pytest.raises(DatasetError, match=r"labels must lie in 0\.\.9"):
        ImageDataset(
            name="x",
            source="y",
            train_images=np.zeros((2, 28, 28), np.uint8),
            train_labels=np.array([0, 10]),
            test_images=np.zeros((1, 28, 28), np.uint8),
            test_labels=np.array([0]),
        )
