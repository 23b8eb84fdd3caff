"""Online accuracy filter (docs/prime_spec.md §1.2): keep prompt groups whose mean accuracy is in [lo, hi]."""
import numpy as np


def accuracy_filter(acc: np.ndarray, n: int, *, lo: float = 0.2, hi: float = 0.8) -> np.ndarray:
    """Indices of the kept groups: acc [B] (rows of one prompt contiguous, n per group) -> int64 [K].

    A group is kept iff lo <= mean(acc of its n rows) <= hi (both inclusive); all-or-nothing
    per group (reference `filter`). With binary acc and n=4 this keeps 1/4, 2/4 and 3/4 correct.
    Means and bounds are compared in float32, as the reference's float32 tensors are: in float64 a
    code group whose float32 mean is 0.8 (four 0.8 scores) reads 0.8000000119 and would be dropped.
    Host-side numpy: it decides which rows go to the device, so it never runs under jit.
    """
    acc = np.asarray(acc, dtype=np.float32)
    if acc.ndim != 1:
        raise ValueError(f"acc must be 1-D [B], got shape {acc.shape}")
    if n < 1 or acc.shape[0] % n:
        raise ValueError(f"n={n}: batch of {acc.shape[0]} rows is not a whole number of groups")
    if not lo <= hi:
        raise ValueError(f"accuracy filter bounds lo={lo} > hi={hi}")
    if not np.all(np.isfinite(acc)):
        raise ValueError("acc contains non-finite values")
    means = acc.reshape(-1, n).mean(axis=1, dtype=np.float32)
    return np.flatnonzero((means >= np.float32(lo)) & (means <= np.float32(hi)))
