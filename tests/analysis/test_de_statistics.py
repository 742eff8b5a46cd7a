"""The blocked, threaded change-mode statistics against a plain numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellvi.analysis._de_stats import _GENE_BLOCK, change_statistics


def _reference(s1, s2, pc, delta):
    r = np.log2(s1 + pc) - np.log2(s2 + pc)
    lfc = np.log2(s1 + 1e-3 * pc) - np.log2(s2 + 1e-3 * pc)
    p_up, p_down = (r >= delta).mean(0), (r < -delta).mean(0)
    return {
        "proba_de": p_up + p_down,
        "scale1": s1.mean(0),
        "scale2": s2.mean(0),
        "lfc_mean": lfc.mean(0),
        "lfc_median": np.median(lfc, axis=0),
        "lfc_std": lfc.std(0),
        "lfc_min": lfc.min(0),
        "lfc_max": lfc.max(0),
    }


@pytest.mark.parametrize("m", [401, 400])  # odd and even sample counts (the median's two cases)
@pytest.mark.parametrize("threads", [1, 2])
def test_change_statistics_match_numpy(m, threads):
    rng = np.random.default_rng(m)
    n_genes = _GENE_BLOCK + 37  # a full block and a partial one
    base = rng.dirichlet(np.ones(n_genes), size=1)[0]
    s1 = rng.dirichlet(base * 500, size=m).astype(np.float32)
    s2 = rng.dirichlet(base * 500 * rng.uniform(0.5, 2, n_genes), size=m).astype(np.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = change_statistics(s1, s2, 1e-6, 0.25, "two")
    finally:
        torch.set_num_threads(before)
    ref = _reference(s1.astype(np.float64), s2.astype(np.float64), 1e-6, 0.25)
    for key, expected in ref.items():
        np.testing.assert_allclose(out[key], expected, rtol=1e-4, atol=2e-5, err_msg=key)


def test_an_estimated_delta_gives_the_tails_of_that_delta():
    rng = np.random.default_rng(3)
    s1 = rng.dirichlet(np.ones(300), size=501).astype(np.float32)
    s2 = rng.dirichlet(np.ones(300), size=501).astype(np.float32)
    estimated = change_statistics(s1, s2, 1e-5, None, "two")
    delta = float(estimated["delta"][0])
    given = change_statistics(s1, s2, 1e-5, delta, "two")
    np.testing.assert_array_equal(estimated["proba_de"], given["proba_de"])
    assert np.all(estimated["lfc_median"] == given["lfc_median"])
