"""Comparisons of a distributed run with the single-process reference.

Arrays are compared element by element, as `torch.testing.assert_close`
does: `|actual - expected| <= atol + rtol * |expected|` for every entry. A
tolerance scaled by an array's largest value would hide a wrong small entry
(a bias's gradient beside a kernel's, a padded row beside a real one).
"""

import numpy as np

# float32 results summed in another order (per-rank partial sums, then an
# all-reduce) differ from one process's by a few ulps (2**-23 = 1.2e-7) of
# the terms summed: RTOL allows 80 ulps of an entry's own value.
RTOL = 1e-5
# An entry that is small because its terms cancel (a gradient near zero)
# keeps the rounding of its terms, whose size is about 1 in these tests'
# data: ATOL allows 8 ulps of a term of magnitude 1.
ATOL = 1e-6


def assert_close(actual, expected, name, rtol=RTOL, atol=ATOL):
    """Every entry of `actual` is within `atol + rtol * |expected|`."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (
        f"{name}: shape {actual.shape} != reference {expected.shape}"
    )
    if actual.dtype.kind not in "fc":
        np.testing.assert_array_equal(actual, expected, err_msg=name)
        return
    actual = actual.astype("float64")
    expected = expected.astype("float64")
    # Equal infinities and NaN where the reference has NaN are equal.
    same = (actual == expected) | (np.isnan(actual) & np.isnan(expected))
    with np.errstate(invalid="ignore"):
        error = np.where(same, 0.0, np.abs(actual - expected))
    allowed = atol + rtol * np.abs(expected)
    bad = ~(error <= allowed)
    if bad.any():
        worst = np.unravel_index(
            np.argmax(np.where(bad, error - allowed, -np.inf)), error.shape
        )
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} entries differ by more "
            f"than atol={atol:g} + rtol={rtol:g} x |reference|; the worst, "
            f"at {tuple(int(i) for i in worst)}, is {actual[worst]!r} "
            f"against {expected[worst]!r}"
        )


def tolerance_used(actual, expected, rtol=RTOL, atol=ATOL):
    """The largest `|actual - expected| / (atol + rtol * |expected|)`: at
    most 1 where `assert_close` passes (for reports)."""
    actual = np.asarray(actual, "float64")
    expected = np.asarray(expected, "float64")
    if actual.size == 0:
        return 0.0
    same = (actual == expected) | (np.isnan(actual) & np.isnan(expected))
    with np.errstate(invalid="ignore"):
        error = np.where(same, 0.0, np.abs(actual - expected))
    return float(np.max(error / (atol + rtol * np.abs(expected))))


def assert_results_match(
    results, reference, prefixes, rtol=RTOL, loose=(), skip=(), atol=ATOL
):
    """Every key of `reference` with one of `prefixes` matches on each rank.

    Args:
        results: One dict of arrays per rank.
        reference: The single-process dict of arrays.
        prefixes: Key prefixes to compare, e.g. `("grad:",)`.
        rtol: Relative tolerance of each entry.
        loose: `{key: (rtol, atol)}` for keys that need a looser tolerance;
            each caller says why.
        skip: Keys the caller checks otherwise, and says why.
        atol: Absolute tolerance of each entry.

    Returns:
        The number of arrays compared per rank.
    """
    keys = [
        k for k in reference if k.startswith(tuple(prefixes)) and k not in skip
    ]
    assert keys, f"no reference keys with prefixes {prefixes}"
    loose = dict(loose)
    for rank, rank_results in enumerate(results):
        for key in keys:
            assert key in rank_results, f"rank {rank} did not record {key}"
            key_rtol, key_atol = loose.get(key, (rtol, atol))
            assert_close(
                rank_results[key],
                reference[key],
                f"rank {rank} {key}",
                rtol=key_rtol,
                atol=key_atol,
            )
    return len(keys)


def assert_same_on_every_rank(results, prefixes):
    """Arrays with `prefixes` are bit-identical across ranks."""
    keys = [k for k in results[0] if k.startswith(tuple(prefixes))]
    for rank, rank_results in enumerate(results[1:], start=1):
        for key in keys:
            np.testing.assert_array_equal(
                rank_results[key], results[0][key], err_msg=f"rank {rank} {key}"
            )
