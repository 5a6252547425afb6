"""Find the same photograph stored under different ids, so it can be treated as one group.

APTOS 2019 holds such duplicates (pixel-identical copies, and re-encoded copies that differ by
JPEG noise only). Two levels:

- exact: SHA-1 of the decoded pixels (:func:`exact_hashes`).
- near: cosine similarity of zero-mean 32 x 32 grey thumbnails >= ``min_similarity``
  (default 0.998). On APTOS (3662 images): 3534 distinct images by exact hash, 3523 groups
  with near duplicates (131 groups of 2-4 images, 37 of them holding different grades); the
  14 pairs found beyond the exact ones differ by < 1 grey level on average, and no pair falls
  between 0.995 and 0.998, so the threshold sits in a natural gap. Average hashes and 64-bit
  DCT hashes are too coarse for fundus photographs (a bright disc on black): the 8 x 8 average
  hash puts 82k pairs at distance 0 and the DCT hash ~290 different-photograph pairs within
  2 bits.

:func:`perceptual_hashes` still gives a compact 64-bit DCT hash per image for quick look-ups.
:func:`merge_groups` joins groupings (patient ids, duplicate groups) into one group id per image
for the grouped splitters of :mod:`medveil.data.splits`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy.fft import dctn
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.neighbors import radius_neighbors_graph

THUMB = 32


def exact_hashes(images: np.ndarray) -> np.ndarray:
    """(N,) hex SHA-1 of each image's shape and pixels; equal hashes = identical images."""
    return np.asarray([
        hashlib.sha1(repr(img.shape).encode() + np.ascontiguousarray(img).tobytes()).hexdigest()
        for img in images
    ])


def thumbnails(images: np.ndarray, size: int = THUMB) -> np.ndarray:
    """(N, size*size) float32 grey thumbnails (box filter) of uint8 (N, H, W[, C]) images."""
    out = np.empty((len(images), size * size), dtype=np.float32)
    for i, img in enumerate(images):
        img = np.asarray(img)
        pil = Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img)
        pil = pil.convert("L").resize((size, size), Image.Resampling.BOX)
        out[i] = np.asarray(pil, dtype=np.float32).ravel()
    return out


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """(N,) uint64 DCT hash: low 8 x 8 DCT of the 32 x 32 thumbnail (no DC) vs its median."""
    thumbs = thumbnails(images).reshape(-1, THUMB, THUMB)
    coeffs = dctn(thumbs, axes=(1, 2), norm="ortho")[:, :8, :8].reshape(len(thumbs), 64)[:, 1:]
    bits = coeffs > np.median(coeffs, axis=1, keepdims=True)
    return (bits.astype(np.uint64) << np.arange(63, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise distance between uint64 hashes (broadcasting)."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    flat = np.ascontiguousarray(x).reshape(-1)
    bits = np.unpackbits(flat.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
    return bits.reshape(x.shape)


def duplicate_groups(images: np.ndarray, min_similarity: float | None = 0.998) -> np.ndarray:
    """(N,) int64 group id per image: identical or near-identical photographs share an id.

    min_similarity: cosine similarity of zero-mean thumbnails counted as the same photograph;
    None keeps exact duplicates only. Ids are 0..G-1, numbered by first appearance.
    """
    n = len(images)
    exact = exact_hashes(images)
    _, first = np.unique(exact, return_inverse=True)
    rows, cols = [np.arange(n)], [first.astype(np.int64) + n]  # image -> its exact-hash node
    if min_similarity is not None and n > 1:
        v = thumbnails(images)
        v -= v.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        v = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
        radius = float(np.sqrt(max(0.0, 2.0 * (1.0 - min_similarity))))  # |u-v|^2 = 2(1-cos)
        near = radius_neighbors_graph(v, radius, mode="connectivity", include_self=False).tocoo()
        rows.append(near.row.astype(np.int64))
        cols.append(near.col.astype(np.int64))
    return _components(np.concatenate(rows), np.concatenate(cols), n + len(exact), n)


def merge_groups(*groupings: Sequence | np.ndarray | None) -> np.ndarray:
    """One group id per item, joining items that share an id in *any* grouping.

    E.g. ``merge_groups(patient_ids, duplicate_groups(images))``: two photographs end up in
    one group when they show the same patient or the same photograph. None entries are skipped.
    """
    given = [np.asarray(g) for g in groupings if g is not None]
    if not given:
        raise ValueError("merge_groups needs at least one grouping")
    n = len(given[0])
    if any(len(g) != n for g in given):
        raise ValueError(f"groupings differ in length: {[len(g) for g in given]}")
    rows, cols, offset = [], [], n
    for g in given:
        _, inverse = np.unique(g, return_inverse=True)
        rows.append(np.arange(n))
        cols.append(inverse.astype(np.int64) + offset)
        offset += int(inverse.max()) + 1 if n else 0
    return _components(np.concatenate(rows), np.concatenate(cols), offset, n)


def _components(rows: np.ndarray, cols: np.ndarray, size: int, n: int) -> np.ndarray:
    """Connected components of an edge list; ids of the first n nodes, renumbered 0..G-1."""
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(size, size))
    _, labels = connected_components(graph, directed=False)
    _, first_seen, renumber = np.unique(labels[:n], return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first_seen))  # number groups by first appearance
    return order[renumber].astype(np.int64)


def split_overlaps(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[str]:
    """Pixel-identical images shared by two splits, or repeated inside one: one line per finding
    (empty when there are none). ``splits``: name -> (images, labels). An image of a test split
    that also sits in train lets a model score it from memory; a copy with another label is a
    labelling conflict. Counts are of images of the later split (or of repeats within a split)."""
    hashes = {name: exact_hashes(images) for name, (images, _) in splits.items()}
    out = []
    names = list(splits)
    for i, a in enumerate(names):
        first: dict[str, int] = {}
        for j, h in enumerate(hashes[a]):
            first.setdefault(h, j)
        repeats = len(hashes[a]) - len(first)
        if repeats:
            out.append(f"{a}: {repeats} image(s) repeat an earlier image of {a}")
        for b in names[i + 1:]:
            shared = [(first[h], k) for k, h in enumerate(hashes[b]) if h in first]
            if shared:
                la, lb = splits[a][1], splits[b][1]
                conflicts = sum(not np.array_equal(la[x], lb[y]) for x, y in shared)
                out.append(f"{a} and {b}: {len(shared)} image(s) of {b} also in {a}"
                           + (f" ({conflicts} with another label)" if conflicts else ""))
    return out
