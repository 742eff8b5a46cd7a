"""Epoch metrics are means over the epoch's cells, whatever the minibatch sizes."""

from __future__ import annotations

import numpy as np

from cellvi.model import SCVI


def test_epoch_loss_is_the_mean_over_cells_so_it_equals_reconstruction_at_kl_weight_0(sim_tiny):
    SCVI.setup_anndata(sim_tiny, batch_key="batch")
    model = SCVI(sim_tiny, n_hidden=16, n_latent=4)
    # 180 training cells in minibatches of 128 and 52: an unweighted mean of minibatch
    # losses would over-weight the small last one
    model.train(
        max_epochs=2,
        batch_size=128,
        train_size=0.9,
        check_val_every_n_epoch=1,
        datasplitter_kwargs={"drop_last": False},
        plan_kwargs={"min_kl_weight": 0.0, "max_kl_weight": 0.0},
    )
    history = model.history
    for split in ("train", "validation"):
        loss = history[f"{split}_loss"][f"{split}_loss"].to_numpy()
        rec = history[f"reconstruction_loss_{split}"][f"reconstruction_loss_{split}"].to_numpy()
        np.testing.assert_allclose(loss, rec, rtol=1e-6)
