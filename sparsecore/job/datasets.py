"""Datasets for the training job: an IDX reader and Fashion-MNIST with an embedded fallback.

NumPy only, so the core stays free of any deep-learning framework. The IDX format (used by
MNIST and Fashion-MNIST) is: two zero bytes, a type code, the number of dimensions, one
big-endian uint32 per dimension, then the values in big-endian C order. Files are often
gzip-compressed; compression is detected from the first bytes, never from the file name,
because renamed or re-downloaded files routinely lie about it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "EMBEDDED_FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "DatasetError",
    "ImageDataset",
    "load_embedded_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
    "write_idx",
]

#: Where Debian's ``dataset-fashion-mnist`` package installs the four IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

#: File name of the embedded subset inside the package's ``data`` folder.
EMBEDDED_FASHION_MNIST = "fashion_mnist_subset.npz"

#: The standard Fashion-MNIST file names (each may also carry a ``.gz`` suffix).
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_GZIP_MAGIC = b"\x1f\x8b"

# IDX type code -> NumPy dtype (big-endian, as stored).
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetError(ValueError):
    """A dataset file is missing, truncated or malformed; the message names the file."""


@dataclass(frozen=True)
class ImageDataset:
    """Train and test images (uint8, ``(N, H, W)``) with int64 labels, and where they came from."""

    name: str
    source: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...] = FASHION_MNIST_CLASSES
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.train_images.ndim == 3 and self.test_images.ndim == 3:
            train_hw, test_hw = self.train_images.shape[1:], self.test_images.shape[1:]
            if train_hw != test_hw:
                raise DatasetError(
                    f"{self.name} ({self.source}): train images are {train_hw[0]}x{train_hw[1]} "
                    f"pixels but test images {test_hw[0]}x{test_hw[1]}"
                )
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.ndim != 3 or images.dtype != np.uint8:
                raise DatasetError(
                    f"{self.name} ({self.source}): {split} images must be uint8 (N, H, W), "
                    f"got {images.dtype} {images.shape}"
                )
            if labels.shape != (images.shape[0],):
                raise DatasetError(
                    f"{self.name} ({self.source}): {split} has {images.shape[0]} images but "
                    f"labels of shape {labels.shape}"
                )
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
                raise DatasetError(
                    f"{self.name} ({self.source}): {split} labels must lie in "
                    f"0..{len(self.classes) - 1}, got {labels.min()}..{labels.max()}"
                )

    @property
    def image_shape(self) -> tuple[int, int]:
        return (int(self.train_images.shape[1]), int(self.train_images.shape[2]))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description: name, source and sizes (what the job reports)."""
        return {
            "name": self.name,
            "source": self.source,
            "train_size": int(self.train_images.shape[0]),
            "test_size": int(self.test_images.shape[0]),
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            **self.notes,
        }

    @functools.cached_property
    def fingerprint(self) -> dict[str, Any]:
        """What identifies this data: name, sizes, image shape, classes and a SHA-256 of each
        split's images and labels (labels as little-endian int64). Computed once (a tenth of a
        second for the full Fashion-MNIST); a resumed run compares it with the checkpoint's."""
        out: dict[str, Any] = {
            "name": self.name,
            "train_size": int(self.train_images.shape[0]),
            "test_size": int(self.test_images.shape[0]),
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
        }
        for split in ("train", "test"):
            digest = hashlib.sha256()
            digest.update(np.ascontiguousarray(getattr(self, f"{split}_images")).tobytes())
            digest.update(np.asarray(getattr(self, f"{split}_labels"), dtype="<i8").tobytes())
            out[f"{split}_sha256"] = digest.hexdigest()
        return out

    def file_of(self, key: str) -> str:
        """Where split ``key`` (``train_images``, ...) came from: the IDX file or the source."""
        files = self.notes.get("files", {})
        return str(Path(self.source) / files[key]) if key in files else self.source

    def subset(self, limit_train: int | None = None, limit_test: int | None = None) -> ImageDataset:
        """The first ``limit_train`` / ``limit_test`` examples (for quick runs and tests)."""
        for label, limit in (("limit_train", limit_train), ("limit_test", limit_test)):
            if limit is not None and limit <= 0:
                raise ValueError(f"{label} must be a positive number of examples, got {limit}")
        ntr = self.train_images.shape[0] if limit_train is None else limit_train
        nte = self.test_images.shape[0] if limit_test is None else limit_test
        notes = dict(self.notes)
        if limit_train is not None or limit_test is not None:
            notes["limited_from"] = {
                "train_size": int(self.train_images.shape[0]),
                "test_size": int(self.test_images.shape[0]),
            }
        return ImageDataset(
            name=self.name,
            source=self.source,
            train_images=self.train_images[:ntr],
            train_labels=self.train_labels[:ntr],
            test_images=self.test_images[:nte],
            test_labels=self.test_labels[:nte],
            classes=self.classes,
            notes=notes,
        )


def _open_bytes(path: Path) -> bytes:
    """The file's content, gunzipped if it starts with the gzip magic bytes."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory, expected an IDX file") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{path}: gzip data is corrupt or truncated ({exc})") from None
    return raw


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a native-endian NumPy array.

    Raises :class:`DatasetError` naming the file for a bad magic number, an unknown type code,
    or a payload shorter or longer than the header's dimensions say.
    """
    path = Path(path)
    data = _open_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: only {len(data)} bytes, too short for an IDX header")
    if data[0] != 0 or data[1] != 0:
        raise DatasetError(
            f"{path}: not an IDX file (magic starts with bytes {data[0]:#04x} {data[1]:#04x}, "
            "expected 0x00 0x00)"
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX type code {code:#04x}")
    if ndim == 0:
        raise DatasetError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(
            f"{path}: truncated header ({len(data)} bytes, {ndim} dimensions need {header_len})"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    # Python integers: a header whose dimensions multiply past 2**63 must not wrap around.
    expected = math.prod(shape) * dtype.itemsize
    payload = len(data) - header_len
    if payload < expected:
        raise DatasetError(
            f"{path}: truncated data: header shape {shape} needs {expected} bytes, "
            f"file has {payload}"
        )
    if payload > expected:
        raise DatasetError(
            f"{path}: {payload - expected} unexpected bytes after the data of shape {shape}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike[str], array: np.ndarray, *, compress: bool = False) -> None:
    """Write ``array`` as an IDX file (gzip-compressed if ``compress``); the inverse of read_idx."""
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX needs 1..255 dimensions, got {array.ndim}")
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    body = np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    content = header + body
    if compress:
        content = gzip.compress(content, mtime=0)
    Path(path).write_bytes(content)


def _find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four Fashion-MNIST files in ``directory`` (plain or .gz), or None if any is missing."""
    found: dict[str, Path] = {}
    for key, stem in FASHION_MNIST_FILES.items():
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _load_idx_directory(directory: Path) -> ImageDataset:
    files = _find_idx_files(directory)
    if files is None:
        missing = [
            stem
            for stem in FASHION_MNIST_FILES.values()
            if not (directory / stem).is_file() and not (directory / f"{stem}.gz").is_file()
        ]
        raise DatasetError(
            f"{directory}: missing Fashion-MNIST file(s) {', '.join(missing)} (with or without .gz)"
        )
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DatasetError(
                f"{files[f'{split}_images']}: expected uint8 images of shape (N, H, W), "
                f"got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DatasetError(
                f"{files[f'{split}_labels']}: {labels.shape} labels do not match "
                f"{images.shape[0]} images in {files[f'{split}_images']}"
            )
    return ImageDataset(
        name="fashion-mnist",
        source=str(directory),
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int64),
        notes={"files": {key: path.name for key, path in files.items()}},
    )


def load_embedded_fashion_mnist() -> ImageDataset:
    """The stratified Fashion-MNIST subset shipped inside the package (MIT, Zalando Research).

    Used when no full copy is installed, so the first command of the README works anywhere.
    """
    resource = resources.files("sparsecore") / "data" / EMBEDDED_FASHION_MNIST
    if not resource.is_file():
        raise DatasetError(
            f"embedded dataset {EMBEDDED_FASHION_MNIST} is missing from the sparsecore package "
            "(reinstall it, or pass --data PATH to the Fashion-MNIST IDX files)"
        )
    with resource.open("rb") as handle, np.load(handle) as archive:
        arrays = {key: archive[key] for key in archive.files}
    return ImageDataset(
        name="fashion-mnist-subset",
        source=f"embedded:sparsecore/data/{EMBEDDED_FASHION_MNIST}",
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int64),
        notes={
            "subset_of": "fashion-mnist",
            "selection": str(arrays["selection"]) if "selection" in arrays else "stratified",
            "license": "MIT (Zalando Research)",
        },
    )


def load_fashion_mnist(
    path: str | os.PathLike[str] | None = None,
    *,
    search_dirs: tuple[str | os.PathLike[str], ...] = (DEBIAN_FASHION_MNIST,),
    allow_embedded: bool = True,
) -> ImageDataset:
    """Load Fashion-MNIST: from ``path`` if given, else the first of ``search_dirs`` holding it,
    else the embedded subset.

    An explicit ``path`` never falls back: if the user named a directory, a missing or broken
    file there is an error, not a silent switch to another dataset.
    """
    if path is not None:
        directory = Path(path)
        if not directory.is_dir():
            raise DatasetError(f"{directory}: not a directory (expected the Fashion-MNIST files)")
        return _load_idx_directory(directory)
    for candidate in search_dirs:
        directory = Path(candidate)
        if directory.is_dir() and _find_idx_files(directory) is not None:
            return _load_idx_directory(directory)
    if not allow_embedded:
        searched = ", ".join(str(d) for d in search_dirs) or "(no directories)"
        raise DatasetError(f"Fashion-MNIST not found in {searched} and the fallback is disabled")
    return load_embedded_fashion_mnist()
