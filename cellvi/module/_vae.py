"""The SCVI variational autoencoder: pure torch, no AnnData."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .._constants import REGISTRY_KEYS
from ..dataloaders import SparseRows
from ..distributions import (
    NegativeBinomial,
    Normal,
    Poisson,
    ZeroInflatedNegativeBinomial,
    log_nb_positive,
    log_normal_density,
    log_poisson,
    log_zinb_positive,
    nb_log_likelihood,
    nb_log_likelihood_gammaless,
    poisson_log_likelihood,
    poisson_log_likelihood_gammaless,
    zinb_log_likelihood,
    zinb_log_likelihood_gammaless,
)
from ..nn import HIDDEN_ACTIVATIONS, VARIANCE_ACTIVATIONS, CountDecoder, Encoder
from ._base import LossOutput, kl_normal_normal, kl_normal_standard
from ._vae_config import VAEConfig

__all__ = ["VAE"]

_K = REGISTRY_KEYS


def _fc_options(extra: dict | None) -> dict:
    """FC stack arguments from ``extra_encoder_kwargs``/``extra_decoder_kwargs``."""
    extra = extra or {}
    return {
        "activation": HIDDEN_ACTIVATIONS[extra.get("activation_fn", "relu")],
        "use_activation": extra.get("use_activation", True),
        "bias": extra.get("bias", True),
    }


class VAE(nn.Module):
    """Variational autoencoder for counts (the SCVI model, ``models.md`` §1).

    Parameters
    ----------
    n_input
        Number of genes.
    config
        Architecture (:class:`~cellvi.module.VAEConfig`).
    n_batch, n_labels
        Number of batch and label categories.
    n_continuous_cov
        Number of continuous covariates.
    n_cats_per_cov
        Category counts of the extra categorical covariates.
    library_log_means, library_log_vars
        Per-batch mean and variance of the log library size, shape ``(1, n_batch)``;
        required when the library size is learned.
    use_size_factor_key
        Library size comes from registered size factors (``l = log sf``).
    """

    #: :meth:`inference` also takes the counts as :class:`~cellvi.dataloaders.SparseRows`
    #: (analyses that only encode and decode pass them; losses need dense counts).
    accepts_sparse_x = True

    def __init__(
        self,
        n_input: int,
        config: VAEConfig | None = None,
        *,
        n_batch: int = 1,
        n_labels: int = 1,
        n_continuous_cov: int = 0,
        n_cats_per_cov: Sequence[int] = (),
        library_log_means: torch.Tensor | None = None,
        library_log_vars: torch.Tensor | None = None,
        use_size_factor_key: bool = False,
    ):
        super().__init__()
        cfg = config or VAEConfig()
        self.config = cfg
        self.n_input, self.n_batch, self.n_labels = n_input, n_batch, n_labels
        self.n_continuous_cov = n_continuous_cov
        self.use_size_factor_key = use_size_factor_key
        self.observed_library = cfg.use_observed_lib_size or use_size_factor_key
        if not self.observed_library:
            if library_log_means is None or library_log_vars is None:
                raise ValueError(
                    "use_observed_lib_size=False needs library_log_means and library_log_vars."
                )
            self.register_buffer("library_log_means", torch.as_tensor(library_log_means).float())
            self.register_buffer("library_log_vars", torch.as_tensor(library_log_vars).float())

        if cfg.dispersion == "gene":
            self.px_r = nn.Parameter(torch.randn(n_input))
        elif cfg.dispersion == "gene-batch":
            self.px_r = nn.Parameter(torch.randn(n_input, n_batch))
        elif cfg.dispersion == "gene-label":
            self.px_r = nn.Parameter(torch.randn(n_input, n_labels))
        else:  # gene-cell: predicted by the decoder
            self.px_r = None

        self.use_batch_embedding = cfg.batch_representation == "embedding"
        if self.use_batch_embedding:
            emb_options = dict(cfg.batch_embedding_kwargs or {})
            emb_options.pop("embedding_dim", None)  # already folded into batch_embedding_dim
            self.batch_embedding = nn.Embedding(n_batch, cfg.batch_embedding_dim, **emb_options)
            batch_cats: list[int] = []
        else:
            batch_cats = [n_batch]
        cat_list = batch_cats + list(n_cats_per_cov)
        emb_dim = cfg.batch_embedding_dim if self.use_batch_embedding else 0
        enc_bn = cfg.use_batch_norm in ("encoder", "both")
        dec_bn = cfg.use_batch_norm in ("decoder", "both")
        enc_ln = cfg.use_layer_norm in ("encoder", "both")
        dec_ln = cfg.use_layer_norm in ("decoder", "both")
        enc_cov = cfg.encode_covariates
        encoder_kwargs = {
            "n_cat_list": cat_list if enc_cov else [],
            "n_cont": n_continuous_cov if enc_cov else 0,
            "n_layers": cfg.n_layers,
            "n_hidden": cfg.n_hidden,
            "dropout_rate": cfg.dropout_rate,
            "use_batch_norm": enc_bn,
            "use_layer_norm": enc_ln,
            "inject_covariates": cfg.deeply_inject_covariates,
            "var_eps": cfg.var_eps,
            "var_activation": VARIANCE_ACTIVATIONS[cfg.var_activation or "exp"],
            **_fc_options(cfg.extra_encoder_kwargs),
        }
        n_enc_in = n_input + (emb_dim if enc_cov else 0)
        self.z_encoder = Encoder(
            n_enc_in, cfg.n_latent, distribution=cfg.latent_distribution, **encoder_kwargs
        )
        self.l_encoder = (
            None
            if self.observed_library
            else Encoder(n_enc_in, 1, **{**encoder_kwargs, "n_layers": 1})
        )
        self.decoder = CountDecoder(
            cfg.n_latent + emb_dim,
            n_input,
            n_cat_list=cat_list,
            n_cont=n_continuous_cov,
            n_layers=cfg.n_layers,
            n_hidden=cfg.n_hidden,
            inject_covariates=cfg.deeply_inject_covariates,
            use_batch_norm=dec_bn,
            use_layer_norm=dec_ln,
            scale_activation="softplus" if use_size_factor_key else "softmax",
            gene_cell_dispersion=cfg.dispersion == "gene-cell",
            **_fc_options(cfg.extra_decoder_kwargs),
        )

    # ------------------------------------------------------------------ helpers
    def _covariates(self, tensors: dict[str, torch.Tensor], batch_index: torch.Tensor):
        """Categorical covariate list and continuous covariates of a minibatch."""
        cat = [] if self.use_batch_embedding else [batch_index]
        if _K.CAT_COVS_KEY in tensors:
            cat_covs = tensors[_K.CAT_COVS_KEY]
            cat = cat + list(cat_covs.split(1, dim=1))
        cont = tensors.get(_K.CONT_COVS_KEY)
        return cat, cont

    def _with_embedding(self, h: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        emb = self.batch_embedding(batch_index.reshape(-1))  # (cells, emb_dim)
        if h.dim() == 3:
            emb = emb.expand(h.shape[0], *emb.shape)
        return torch.cat([h, emb], dim=-1)

    # --------------------------------------------------------------- inference
    def inference(
        self,
        tensors: dict[str, torch.Tensor],
        n_samples: int = 1,
        library: bool = True,
        sample_z: bool = True,
    ) -> dict[str, torch.Tensor | None]:
        """Encode a minibatch: ``qz_m``, ``qz_v``, ``z``, ``ql_m``, ``ql_v``, ``library``.

        ``library=False`` skips the library size (then ``library``, ``ql_m`` and ``ql_v`` are
        None): outputs that only need ``z``, such as latents and normalized expression.
        ``sample_z=False`` skips drawing ``z`` (None): outputs that only need q(z | x).
        """
        x = tensors[_K.X_KEY]
        batch_index = tensors[_K.BATCH_KEY]
        sparse_x = isinstance(x, SparseRows)  # inference on sparse counts (see accepts_sparse_x)
        if self.config.log_variational:
            x_in = x.map_values(torch.log1p) if sparse_x else torch.log1p(x)
        else:
            x_in = x
        cat, cont = self._covariates(tensors, batch_index)
        if self.config.encode_covariates:
            if self.use_batch_embedding:
                x_in = self._with_embedding(x_in.to_dense() if sparse_x else x_in, batch_index)
            enc_cat, enc_cont = cat, cont
        else:
            enc_cat, enc_cont = [], None
        # one draw here; several are drawn below from the posterior
        one = sample_z and n_samples == 1
        qz_m, qz_v, z = self.z_encoder(x_in, *enc_cat, cont=enc_cont, sample=one)
        ql_m = ql_v = None
        if not library:  # the flag; from here on ``library`` holds the log library size
            library = None
        elif self.use_size_factor_key:
            library = torch.log(tensors[_K.SIZE_FACTOR_KEY])
        elif self.observed_library:
            library = torch.log(x.row_sums() if sparse_x else x.sum(dim=1, keepdim=True))
        else:
            ql_m, ql_v, library = self.l_encoder(x_in, *enc_cat, cont=enc_cont)
        if n_samples > 1:
            if sample_z:
                qz_m_s = qz_m.expand(n_samples, *qz_m.shape)
                qz_v_s = qz_v.expand(n_samples, *qz_v.shape)
                z = qz_m_s + qz_v_s.sqrt() * torch.randn_like(qz_m_s)
                if self.config.latent_distribution == "ln":
                    z = torch.softmax(z, dim=-1)
            if ql_m is not None:
                library = ql_m + ql_v.sqrt() * torch.randn(
                    n_samples, *ql_m.shape, device=ql_m.device
                )
            elif library is not None:
                library = library.expand(n_samples, *library.shape)
        return {"qz_m": qz_m, "qz_v": qz_v, "z": z, "ql_m": ql_m, "ql_v": ql_v, "library": library}

    # -------------------------------------------------------------- generative
    def dispersion(self, px: dict, batch_index: torch.Tensor, labels: torch.Tensor | None):
        """Inverse dispersion θ, shape ``(genes,)`` or broadcastable to ``(cells, genes)``.

        For ``gene_likelihood="normal"`` the same parameter is the standard deviation σ.
        """
        d = self.config.dispersion
        if d == "gene":
            return self.px_r.exp()
        if d == "gene-batch":
            return F.embedding(batch_index.reshape(-1), self.px_r.T).exp()
        if d == "gene-label":
            return F.embedding(labels.reshape(-1), self.px_r.T).exp()
        return px["dispersion_logit"].exp()

    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        transform_batch: int | None = None,
        scale_only: bool = False,
        scale_out: torch.Tensor | None = None,
    ) -> dict:
        """Decode ``z`` into the likelihood parameters (``scale_only``: just ρ, for outputs;
        ``scale_out``: a tensor ρ is written into, see :class:`~cellvi.nn.CountDecoder`)."""
        batch_index = tensors[_K.BATCH_KEY]
        if transform_batch is not None:
            batch_index = torch.full_like(batch_index, int(transform_batch))
        cat, cont = self._covariates(tensors, batch_index)
        z_in = self._with_embedding(z, batch_index) if self.use_batch_embedding else z
        px = self.decoder(
            z_in,
            library,
            *cat,
            cont=cont,
            need_dropout=self.config.gene_likelihood == "zinb" and not scale_only,
            scale_only=scale_only,
            scale_out=scale_out,
        )
        if scale_only:
            return px
        labels = tensors.get(_K.LABELS_KEY)
        px["theta"] = (
            None
            if self.config.gene_likelihood == "poisson"
            else self.dispersion(px, batch_index, labels)
        )
        return px

    @staticmethod
    def rate(px: dict) -> torch.Tensor:
        """Mean of the counts, μ = e^l ρ."""
        return px["log_rate"].exp()

    def likelihood(self, px: dict):
        """The count distribution p(x | z, l) as a torch ``Distribution``.

        ``"normal"``: ``N(μ, σ²)`` with ``σ = px["theta"]`` (see :class:`VAEConfig`).
        """
        lik = self.config.gene_likelihood
        if lik == "normal":
            rate = self.rate(px)
            return Normal(rate, px["theta"].expand_as(rate), rho=px["scale"])
        if lik == "zinb":
            return ZeroInflatedNegativeBinomial(
                mu=self.rate(px),
                theta=px["theta"],
                zi_logits=px["dropout_logits"],
                scale=px["scale"],
            )
        if lik == "nb":
            return NegativeBinomial(mu=self.rate(px), theta=px["theta"], scale=px["scale"])
        return Poisson(rate=self.rate(px), scale=px["scale"])

    def log_likelihood(self, x: torch.Tensor, px: dict) -> torch.Tensor:
        """``log p(x | z, l)`` summed over genes, shape ``(..., cells)``.

        For a plain ``(cells, genes)`` minibatch this uses the fused kernels of
        :mod:`cellvi.distributions` (hand-written gradients, log-gamma only at nonzeros);
        with a leading sample axis it falls back to the elementwise formulas. The Gaussian
        of ``"normal"`` is one elementwise formula in every case (compiled or not).
        """
        lik = self.config.gene_likelihood
        theta = px["theta"]
        if lik == "normal":
            return log_normal_density(x, self.rate(px), theta).sum(dim=-1)
        if px["log_rate"].dim() == 2 and torch.compiler.is_compiling():
            if lik == "zinb":
                return zinb_log_likelihood_gammaless(x, px["log_rate"], theta, px["dropout_logits"])
            if lik == "nb":
                return nb_log_likelihood_gammaless(x, px["log_rate"], theta)
            return poisson_log_likelihood_gammaless(x, px["log_rate"])
        if px["log_rate"].dim() == 3 and isinstance(x, torch.Tensor):
            # samples × cells: the fused kernels on the flattened (samples · cells) rows
            k, b, g = px["log_rate"].shape

            def flat(t):
                return t if t is None or t.dim() == 1 else t.expand(k, b, g).reshape(k * b, g)

            rows = {**px, "log_rate": flat(px["log_rate"]), "theta": flat(theta)}
            rows["dropout_logits"] = flat(px.get("dropout_logits"))
            return self.log_likelihood(flat(x), rows).reshape(k, b)
        if px["log_rate"].dim() == 2:
            if lik == "zinb":
                return zinb_log_likelihood(x, px["log_rate"], theta, px["dropout_logits"])
            if lik == "nb":
                return nb_log_likelihood(x, px["log_rate"], theta)
            return poisson_log_likelihood(x, px["log_rate"])
        if lik == "zinb":
            ll = log_zinb_positive(x, self.rate(px), theta, px["dropout_logits"])
        elif lik == "nb":
            ll = log_nb_positive(x, self.rate(px), theta)
        else:
            ll = log_poisson(x, self.rate(px))
        return ll.sum(dim=-1)

    # -------------------------------------------------------------------- loss
    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """Negative ELBO of a minibatch (``models.md`` §1)."""
        x = tensors[_K.X_KEY]
        reconst = -self.log_likelihood(x, generative_outputs)
        kl_z = kl_normal_standard(inference_outputs["qz_m"], inference_outputs["qz_v"])
        if self.observed_library:
            kl_l = torch.zeros_like(kl_z)
        else:
            batch = tensors[_K.BATCH_KEY].reshape(-1)
            prior_m = self.library_log_means[0, batch].unsqueeze(-1)
            prior_v = self.library_log_vars[0, batch].unsqueeze(-1)
            kl_l = kl_normal_normal(
                inference_outputs["ql_m"], inference_outputs["ql_v"], prior_m, prior_v
            )
        loss = torch.mean(reconst + kl_weight * kl_z + kl_l)
        return LossOutput(
            loss=loss,
            reconstruction_loss=reconst,
            kl_local=kl_z + kl_l,
            kl_global=torch.zeros((), device=x.device),
        )

    def forward(self, tensors: dict[str, torch.Tensor], kl_weight: float = 1.0) -> LossOutput:
        """Inference, generative pass and loss in one call (what a training step runs)."""
        inf = self.inference(tensors)
        gen = self.generative(inf["z"], inf["library"], tensors)
        return self.loss(tensors, inf, gen, kl_weight=kl_weight)
