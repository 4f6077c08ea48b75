"""SIIM-ACR Pneumothorax: the relative, column-major run-length encoding of train-rle.csv."""
from __future__ import annotations

import numpy as np

from pipeline.common import MflagError


class RLEError(MflagError):
    pass


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode a SIIM RLE string to an (height, width) uint8 0/1 mask.

    Pairs are (background pixels since the end of the previous run, run length), counted over the
    column-major flattening (``mask.T.flatten()``). ``"-1"`` (with or without spaces) is empty.
    """
    rle = rle.strip()
    flat = np.zeros(height * width, dtype=np.uint8)
    if rle in ("-1", ""):
        return flat.reshape(width, height).T.copy()
    try:
        nums = [int(t) for t in rle.split()]
    except ValueError as e:
        raise RLEError(f"RLE has a non-integer token: {e}") from None
    if len(nums) % 2:
        raise RLEError(f"RLE has an odd number of tokens ({len(nums)})")
    pos = 0
    for start, length in zip(nums[0::2], nums[1::2]):
        if start < 0 or length <= 0:
            raise RLEError(f"RLE has a negative offset or non-positive run ({start} {length})")
        pos += start
        if pos + length > flat.size:
            raise RLEError(
                f"RLE run {pos}+{length} goes past the end of a {height}x{width} image ({flat.size} pixels)")
        flat[pos:pos + length] = 1
        pos += length
    return flat.reshape(width, height).T.copy()


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D 0/1 mask as SIIM relative column-major RLE; ``"-1"`` for an empty mask.

    A run touching the last pixel is kept (the official sample encoder drops it).
    """
    flat = (np.asarray(mask).T.reshape(-1) > 0).astype(np.int8)
    padded = np.concatenate([[0], flat, [0]])
    edges = np.flatnonzero(np.diff(padded))
    if edges.size == 0:
        return "-1"
    starts, ends = edges[0::2], edges[1::2]
    lengths = ends - starts
    gaps = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(f"{g} {n}" for g, n in zip(gaps, lengths))
