"""Comparisons of a distributed run with the single-process reference."""

import numpy as np

# float32 reductions summed in another order (per-rank partial sums, then an
# all-reduce) differ from one process's by a few ulps of the largest term.
RTOL = 1e-5


def assert_close(actual, expected, name, rtol=RTOL):
    """`actual` equals `expected` within `rtol` of the largest magnitude."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (
        f"{name}: shape {actual.shape} != reference {expected.shape}"
    )
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-6)
    error = float(np.max(np.abs(actual - expected), initial=0.0))
    assert error <= rtol * scale, (
        f"{name}: max |difference| {error:.3g} exceeds {rtol} x {scale:.3g}"
    )


def assert_results_match(
    results, reference, prefixes, rtol=RTOL, loose=(), skip=()
):
    """Every key of `reference` with one of `prefixes` matches on each rank.

    Args:
        results: One dict of arrays per rank.
        reference: The single-process dict of arrays.
        prefixes: Key prefixes to compare, e.g. `("grad:",)`.
        rtol: Relative tolerance (of each array's largest magnitude).
        loose: `{key: rtol}` for keys that need a looser tolerance; each
            caller says why.
        skip: Keys the caller checks otherwise, and says why.

    Returns:
        The number of arrays compared per rank.
    """
    keys = [
        k for k in reference if k.startswith(tuple(prefixes)) and k not in skip
    ]
    assert keys, f"no reference keys with prefixes {prefixes}"
    for rank, rank_results in enumerate(results):
        for key in keys:
            assert key in rank_results, f"rank {rank} did not record {key}"
            assert_close(
                rank_results[key],
                reference[key],
                f"rank {rank} {key}",
                rtol=dict(loose).get(key, rtol),
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
