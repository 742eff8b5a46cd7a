"""The RNA outputs of a trained model (``analysis.md`` §1-§4) as model methods.

Each method is a thin wrapper over a :mod:`cellvi.analysis` function; the mixin needs the
model's ``module``, ``_data_source`` and ``_manager_for`` (from ``BaseModel``).
"""

from __future__ import annotations

from .. import analysis

__all__ = ["RNAOutputsMixin"]


class RNAOutputsMixin:
    """Latents, normalized expression, likelihood outputs and DE for count models."""

    def get_latent_representation(
        self,
        adata=None,
        indices=None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
        dataloader=None,
    ):
        """Posterior mean (or a draw, or the Gaussian's parameters) of ``z`` per cell.

        See :func:`cellvi.analysis.get_latent_representation`.
        """
        adata, indices = self._data_source(adata, indices, dataloader)
        return analysis.get_latent_representation(
            self, adata, indices, give_mean, mc_samples, batch_size, return_dist
        )

    def get_normalized_expression(
        self,
        adata=None,
        indices=None,
        transform_batch=None,
        gene_list=None,
        library_size: float | str = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        weights: str | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        silent: bool = True,
        dataloader=None,
        **importance_weighting_kwargs,
    ):
        """Decoded expression per cell; see :func:`cellvi.analysis.get_normalized_expression`.

        ``importance_weighting_kwargs`` (with ``weights="importance"``): ``max_cells``,
        ``truncation``, ``n_mc_samples``, ``n_mc_samples_per_pass``; also ``seed`` (0: the
        same values at every call; None: fresh draws from the global torch stream). ``silent``
        is accepted for scvi-tools compatibility: cellvi shows no per-minibatch progress.
        """
        adata, indices = self._data_source(adata, indices, dataloader)
        return analysis.get_normalized_expression(
            self,
            adata,
            indices,
            transform_batch,
            gene_list,
            library_size,
            n_samples,
            n_samples_overall,
            weights,
            batch_size,
            return_mean,
            return_numpy,
            **importance_weighting_kwargs,
        )

    def posterior_predictive_sample(
        self,
        adata=None,
        indices=None,
        transform_batch=None,
        n_samples: int = 1,
        gene_list=None,
        batch_size: int | None = None,
        dataloader=None,
        silent: bool = True,
    ):
        """Counts drawn from the posterior predictive; see :mod:`cellvi.analysis`.

        ``silent`` is accepted for scvi-tools compatibility: cellvi shows no per-minibatch
        progress for this call.
        """
        adata, indices = self._data_source(adata, indices, dataloader)
        return analysis.posterior_predictive_sample(
            self, adata, indices, transform_batch, n_samples, gene_list, batch_size
        )

    def get_likelihood_parameters(
        self,
        adata=None,
        indices=None,
        n_samples: int = 1,
        give_mean: bool = False,
        batch_size: int | None = None,
        dataloader=None,
    ) -> dict:
        """``mean``, ``dispersions`` and ``dropout`` of p(x | z) per cell and gene."""
        adata, indices = self._data_source(adata, indices, dataloader)
        return analysis.get_likelihood_parameters(
            self, adata, indices, n_samples, give_mean, batch_size
        )

    def get_latent_library_size(
        self, adata=None, indices=None, give_mean: bool = True, batch_size=None, dataloader=None
    ):
        """Library size per cell; see :func:`cellvi.analysis.get_latent_library_size`."""
        adata, indices = self._data_source(adata, indices, dataloader)
        return analysis.get_latent_library_size(self, adata, indices, give_mean, batch_size)

    def get_batch_representation(self, adata=None, indices=None, batch_size=None):
        """Each cell's learned batch embedding; see
        :func:`cellvi.analysis.get_batch_representation`."""
        return analysis.get_batch_representation(self, adata, indices, batch_size)

    def get_aggregated_posterior(
        self, adata=None, indices=None, batch_size=None, dof: float | None = 3.0, dataloader=None
    ):
        """The cells' aggregated posterior, a ``torch.distributions`` mixture; see
        :func:`cellvi.analysis.get_aggregated_posterior`."""
        adata, indices = self._data_source(adata, indices, dataloader)
        return analysis.get_aggregated_posterior(self, adata, indices, batch_size, dof)

    def differential_abundance(
        self,
        adata=None,
        sample_key: str | None = None,
        batch_size: int | None = 128,
        num_cells_posterior: int | None = None,
        dof: float | None = None,
        seed: int | None = 0,
    ):
        """Log density of each cell under each sample's aggregated posterior (DataFrame, also
        in ``adata.obsm["da_log_probs"]``); see :func:`cellvi.analysis.differential_abundance`.
        """
        return analysis.differential_abundance(
            self, adata, sample_key, batch_size, num_cells_posterior, dof, seed
        )

    def get_feature_correlation_matrix(
        self,
        adata=None,
        indices=None,
        n_samples: int = 10,
        batch_size: int = 64,
        rna_size_factor: float = 1000,
        transform_batch=None,
        correlation_type: str = "spearman",
        silent: bool = True,
        dataloader=None,
    ):
        """Gene-gene correlation of denoised expression draws; see
        :func:`cellvi.analysis.get_feature_correlation_matrix`.

        ``silent`` is accepted for scvi-tools compatibility: cellvi shows no per-batch
        progress for this call."""
        adata, indices = self._data_source(adata, indices, dataloader)
        return analysis.get_feature_correlation_matrix(
            self,
            adata,
            indices,
            n_samples,
            batch_size,
            rna_size_factor,
            transform_batch,
            correlation_type,
        )

    def get_elbo(
        self, adata=None, indices=None, batch_size=None, dataloader=None, return_mean: bool = True
    ):
        """ELBO (KL weight 1); higher is better."""
        adata, indices = self._data_source(adata, indices, dataloader)
        return analysis.get_elbo(self, adata, indices, batch_size, return_mean)

    def get_reconstruction_error(
        self, adata=None, indices=None, batch_size=None, dataloader=None, return_mean: bool = True
    ) -> dict:
        """Negative log-likelihood of the counts; lower is better."""
        adata, indices = self._data_source(adata, indices, dataloader)
        return analysis.get_reconstruction_error(self, adata, indices, batch_size, return_mean)

    def get_marginal_ll(
        self,
        adata=None,
        indices=None,
        n_mc_samples: int = 1000,
        batch_size=None,
        return_mean: bool = True,
        dataloader=None,
        n_mc_samples_per_pass: int = 1,
    ):
        """Importance-sampled log-likelihood of the data under the model."""
        adata, indices = self._data_source(adata, indices, dataloader)
        return analysis.get_marginal_ll(
            self, adata, indices, n_mc_samples, batch_size, return_mean, n_mc_samples_per_pass
        )

    def differential_expression(
        self,
        adata=None,
        groupby=None,
        group1=None,
        group2=None,
        idx1=None,
        idx2=None,
        mode: str = "vanilla",
        delta: float | None = 0.25,
        batch_size=None,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1=None,
        batchid2=None,
        fdr_target: float = 0.05,
        silent: bool = True,
        weights: str | None = "uniform",
        filter_outlier_cells: bool = False,
        importance_weighting_kwargs: dict | None = None,
        dataloader=None,
        *,
        n_samples_overall: int = 5000,
        pseudocounts: float | None = None,
        threshold_counts: float = 0.01,
        test_mode: str = "three",
        use_permutation: bool = False,
        m_permutation: int = 10000,
        change_fn=None,
        m1_domain_fn=None,
        cred_interval_lvls=None,
        seed: int = 0,
    ):
        """Bayesian DE between groups; see :func:`cellvi.analysis.differential_expression`.

        The arguments after ``dataloader`` are the Bayes-factor options scvi-tools takes as
        ``**kwargs``. ``silent`` is accepted for scvi-tools compatibility: cellvi shows no
        per-minibatch progress for this call.
        """
        adata, _ = self._data_source(adata, None, dataloader)
        return analysis.differential_expression(
            self,
            adata,
            groupby,
            group1,
            group2,
            idx1,
            idx2,
            mode=mode,
            delta=delta,
            batch_size=batch_size,
            all_stats=all_stats,
            batch_correction=batch_correction,
            batchid1=batchid1,
            batchid2=batchid2,
            fdr_target=fdr_target,
            weights=weights,
            filter_outlier_cells=filter_outlier_cells,
            importance_weighting_kwargs=importance_weighting_kwargs,
            n_samples_overall=n_samples_overall,
            pseudocounts=pseudocounts,
            threshold_counts=threshold_counts,
            test_mode=test_mode,
            use_permutation=use_permutation,
            m_permutation=m_permutation,
            change_fn=change_fn,
            m1_domain_fn=m1_domain_fn,
            cred_interval_lvls=cred_interval_lvls,
            seed=seed,
        )
