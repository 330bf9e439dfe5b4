"""Build the embedded Fashion-MNIST subset shipped in ``sparsecore/data/``.

A stratified sample of the real Fashion-MNIST (MIT licence, Zalando Research): the same number
of images per class from the training set and from the test set, chosen with a fixed seed, kept
in the original order of the files. The job falls back to it when no full copy is installed.

    python benchmarks/make_embedded_dataset.py [--data /usr/share/datasets/fashion-mnist]

The output is deterministic for given input files and arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sparsecore.datasets import DEBIAN_FASHION_MNIST, EMBEDDED_FASHION_MNIST, load_fashion_mnist

OUT = Path(__file__).resolve().parents[1] / "sparsecore" / "data" / EMBEDDED_FASHION_MNIST


def stratified_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` indices of every class, drawn without replacement, returned sorted."""
    chosen = []
    for cls in np.unique(labels):
        pool = np.flatnonzero(labels == cls)
        if pool.size < per_class:
            raise ValueError(f"class {cls} has {pool.size} examples, fewer than {per_class}")
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEBIAN_FASHION_MNIST))
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=20190724)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()

    full = load_fashion_mnist(args.data)
    rng = np.random.default_rng(args.seed)
    train_idx = stratified_indices(full.train_labels, args.train_per_class, rng)
    test_idx = stratified_indices(full.test_labels, args.test_per_class, rng)
    selection = (
        f"stratified: {args.train_per_class} train + {args.test_per_class} test images per class "
        f"from Fashion-MNIST, numpy default_rng({args.seed})"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        train_images=full.train_images[train_idx],
        train_labels=full.train_labels[train_idx].astype(np.uint8),
        test_images=full.test_images[test_idx],
        test_labels=full.test_labels[test_idx].astype(np.uint8),
        train_index=train_idx.astype(np.int32),
        test_index=test_idx.astype(np.int32),
        selection=np.array(selection),
    )
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {selection}")


if __name__ == "__main__":
    main()
