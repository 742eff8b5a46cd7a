"""SCANVI's module: SCVI plus a label classifier and a label-conditioned latent hierarchy."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .._constants import REGISTRY_KEYS
from ..nn import Encoder, FCLayers
from ._base import LossOutput, kl_normal_normal, kl_normal_standard, log_normal
from ._vae import VAE
from ._vae_config import VAEConfig

__all__ = ["SCANVAE"]

#: persistent marker: True when decoder_z1_z2 follows the decoder norm settings
_NORM_MARKER = "z1_z2_decoder_follows_norms"


class SCANVAE(VAE):
    """Semi-supervised VAE (``models.md`` §2).

    Generative: ``y ~ Cat(uniform)``, ``z2 ~ N(0, I)``, ``z1 | z2, y ~ N(μ(z2, y), σ²(z2, y))``,
    ``x | z1, l`` as in SCVI. Inference: ``q(z1 | x)`` (the SCVI encoder), ``q(y | z1)`` (the
    classifier) and ``q(z2 | z1, y)``. Every cell of a minibatch is treated as unlabeled with
    ``y`` enumerated; labeled cells add a classification loss in the training plan.

    Parameters
    ----------
    n_input
        Number of genes.
    config
        Architecture shared with SCVI.
    n_labels
        Number of label classes K (the unlabeled category excluded).
    linear_classifier
        A single linear layer as classifier instead of an FC stack.
    classifier_parameters
        scvi-tools' classifier options overriding the defaults: ``n_hidden``, ``n_layers``
        (0 or ``n_hidden=0``: one linear layer), ``dropout_rate``, ``use_batch_norm``,
        ``use_layer_norm`` and ``logits`` (must stay True: the classifier outputs logits).
    y_prior
        Fixed prior probabilities of the K classes (None: uniform); positive, summing to 1.
    **kwargs
        :class:`VAE` arguments (``n_batch``, covariates, library priors).
    """

    def __init__(
        self,
        n_input: int,
        config: VAEConfig | None = None,
        *,
        n_labels: int,
        linear_classifier: bool = False,
        classifier_parameters: dict | None = None,
        y_prior=None,
        **kwargs,
    ):
        super().__init__(n_input, config, n_labels=n_labels + 1, **kwargs)
        cfg = self.config
        self.n_classes = n_labels
        bn = cfg.use_batch_norm in ("encoder", "both")
        ln = cfg.use_layer_norm in ("encoder", "both")
        cls = _classifier_options(
            {
                "n_layers": 0 if linear_classifier else cfg.n_layers,
                "n_hidden": 0 if linear_classifier else cfg.n_hidden,
                "dropout_rate": cfg.dropout_rate,
                "use_batch_norm": bn,
                "use_layer_norm": ln,
            },
            classifier_parameters,
        )
        if cls["n_layers"] == 0 or cls["n_hidden"] == 0:  # scvi-tools: one linear layer
            self.classifier = nn.Linear(cfg.n_latent, n_labels)
        else:
            self.classifier = nn.Sequential(
                FCLayers(
                    cfg.n_latent,
                    cls["n_hidden"],
                    n_layers=cls["n_layers"],
                    n_hidden=cls["n_hidden"],
                    dropout_rate=cls["dropout_rate"],
                    use_batch_norm=cls["use_batch_norm"],
                    use_layer_norm=cls["use_layer_norm"],
                ),
                nn.Linear(cls["n_hidden"], n_labels),
            )
        # not in the state dict (older files load unchanged): the model rebuilds it from its
        # init params
        self.register_buffer("y_prior", _prior(y_prior, n_labels), persistent=False)
        self.encoder_z2_z1 = Encoder(
            cfg.n_latent,
            cfg.n_latent,
            n_cat_list=[n_labels],
            n_layers=cfg.n_layers,
            n_hidden=cfg.n_hidden,
            dropout_rate=cfg.dropout_rate,
            use_batch_norm=bn,
            use_layer_norm=ln,
        )
        # p(z1 | z2, y) follows the decoder norm settings (as scvi-tools); files saved before
        # it did (no marker below) had BatchNorm and no LayerNorm there, see _load_from_state_dict
        self._z1_z2_norms = (
            cfg.use_batch_norm in ("decoder", "both"),
            cfg.use_layer_norm in ("decoder", "both"),
        )
        self.decoder_z1_z2 = self._z1_z2_decoder(*self._z1_z2_norms)
        self.register_buffer(_NORM_MARKER, torch.tensor(True))
        self.pz1_mean = nn.Linear(cfg.n_hidden, cfg.n_latent)
        self.pz1_var = nn.Linear(cfg.n_hidden, cfg.n_latent)

    def _z1_z2_decoder(self, batch_norm: bool, layer_norm: bool) -> FCLayers:
        cfg = self.config
        self._z1_z2_built = (batch_norm, layer_norm)
        return FCLayers(
            cfg.n_latent,
            cfg.n_hidden,
            n_cat_list=[self.n_classes],
            n_layers=cfg.n_layers,
            n_hidden=cfg.n_hidden,
            dropout_rate=0.0,
            use_batch_norm=batch_norm,
            use_layer_norm=layer_norm,
        )

    def _saved_follows_norms(self, state_dict, prefix: str = "") -> bool | None:
        """Whether a saved state's ``decoder_z1_z2`` follows the norm settings (None: the
        state has no such decoder). Files from before it did carry no marker."""
        key = prefix + _NORM_MARKER
        if key in state_dict:
            return bool(state_dict[key])
        if any(k.startswith(prefix + "decoder_z1_z2.") for k in state_dict):
            return False
        return None

    def match_saved_layout(self, state_dict, prefix: str = "") -> None:
        """Rebuild ``decoder_z1_z2`` the way a saved state built it, so that files saved
        before it followed the norm settings (BatchNorm, no LayerNorm) compute what they
        computed then. States without its weights (``from_scvi_model``) change nothing."""
        follows = self._saved_follows_norms(state_dict, prefix)
        if follows is None:
            return
        norms = self._z1_z2_norms if follows else (True, False)
        if norms != self._z1_z2_built:
            ref = self.pz1_mean.weight
            self.decoder_z1_z2 = self._z1_z2_decoder(*norms).to(ref.device, ref.dtype)
        getattr(self, _NORM_MARKER).fill_(follows)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        follows = self._saved_follows_norms(state_dict, prefix)
        if follows is not None:
            self.match_saved_layout(state_dict, prefix)
            state_dict[prefix + _NORM_MARKER] = torch.tensor(follows)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def classify(self, tensors: dict[str, torch.Tensor], use_posterior_mean: bool = True):
        """Class logits ``(cells, K)`` from the posterior mean (or a draw) of ``z1``."""
        # the classifier sees z only
        inf = self.inference(tensors, library=False, sample_z=not use_posterior_mean)
        z = inf["qz_m"] if use_posterior_mean else inf["z"]
        return self.classifier(z)

    def _z2_given_labels(self, z1: torch.Tensor):
        """For every label y, in blocks of the ``n`` cells of ``z1`` ``(n, d)``: the mean,
        variance and one draw of ``q(z2 | z1, y)`` (``K * n`` rows) and
        ``log p(z1 | z2, y)`` ``(K, n)``."""
        n, k = z1.shape[0], self.n_classes
        ys = torch.arange(k, device=z1.device).repeat_interleave(n).reshape(-1, 1)
        z1_rep = z1.repeat(k, 1)  # (K * cells, d), block y = all cells with label y
        qz2_m, qz2_v, z2 = self.encoder_z2_z1(z1_rep, ys)
        h = self.decoder_z1_z2(z2, ys)
        # σ² = exp(Linear(h)) without an epsilon (as scvi-tools), used in log space
        log_pz1 = log_normal(z1_rep, self.pz1_mean(h), log_var=self.pz1_var(h))
        return qz2_m, qz2_v, z2, log_pz1.reshape(k, n)

    def log_prior(self, z1: torch.Tensor) -> torch.Tensor:
        """Log of an unbiased estimate of the prior ``p(z1) = Σ_y p(y) ∫ p(z1|z2,y) p(z2)
        dz2``, shape ``z1.shape[:-1]``: labels enumerated, ``z2`` one draw of
        ``q(z2 | z1, y)`` per label,

            log Σ_y exp[log p(y) + log p(z1 | z2_y, y) + log N(z2_y; 0, I) − log q(z2_y | z1, y)]

        so importance weights built on it stay unbiased for ``p(x)`` (the marginal
        log-likelihood), and one draw bounds the ELBO from above in expectation.
        """
        flat = z1.reshape(-1, z1.shape[-1])
        qz2_m, qz2_v, z2, log_pz1 = self._z2_given_labels(flat)
        k, n = log_pz1.shape
        log_pz2 = log_normal(z2, torch.zeros_like(z2), torch.ones_like(z2)).reshape(k, n)
        log_qz2 = log_normal(z2, qz2_m, qz2_v).reshape(k, n)
        terms = log_pz1 + log_pz2 - log_qz2 + self.y_prior.reshape(k, 1).log()
        return torch.logsumexp(terms, dim=0).reshape(z1.shape[:-1])

    def loss(self, tensors, inference_outputs, generative_outputs, kl_weight: float = 1.0):
        x = tensors[REGISTRY_KEYS.X_KEY]
        z1, qz_m, qz_v = (
            inference_outputs["z"],
            inference_outputs["qz_m"],
            inference_outputs["qz_v"],
        )
        n, k = z1.shape[0], self.n_classes
        log_px = self.log_likelihood(x, generative_outputs)
        log_qz1 = log_normal(z1, qz_m, qz_v)
        probs = F.softmax(self.classifier(z1), dim=-1)  # q(y | z1), (cells, K)
        qz2_m, qz2_v, _, log_pz1 = self._z2_given_labels(z1)
        log_pz1 = log_pz1.T  # (cells, K)
        kl_z2 = kl_normal_standard(qz2_m, qz2_v).reshape(k, n).T
        reconst = -log_px + log_qz1 - (probs * log_pz1).sum(-1)
        kl_y = (probs * (probs.clamp_min(1e-12).log() - self.y_prior.log())).sum(-1)
        kl_local = (probs * kl_z2).sum(-1) + kl_y
        if self.observed_library:
            kl_l = torch.zeros_like(kl_local)
        else:
            b = tensors[REGISTRY_KEYS.BATCH_KEY].reshape(-1)
            kl_l = kl_normal_normal(
                inference_outputs["ql_m"],
                inference_outputs["ql_v"],
                self.library_log_means[0, b].unsqueeze(-1),
                self.library_log_vars[0, b].unsqueeze(-1),
            )
        # models.md §2: the library KL is part of the warmed-up KL in SCANVI (unlike SCVI)
        loss = torch.mean(reconst + kl_weight * (kl_local + kl_l))
        return LossOutput(
            loss=loss,
            reconstruction_loss=reconst,
            kl_local=kl_local + kl_l,
            kl_global=torch.zeros((), device=x.device),
        )


_CLASSIFIER_KEYS = ("n_hidden", "n_layers", "dropout_rate", "use_batch_norm", "use_layer_norm")


def _classifier_options(defaults: dict, given: dict | None) -> dict:
    """scvi-tools' ``classifier_parameters`` checked and laid over the defaults."""
    given = dict(given or {})
    if not given.pop("logits", True):
        raise ValueError(
            "classifier_parameters={'logits': False} is not supported: the classifier outputs "
            "logits (the softmax is applied where probabilities are needed)."
        )
    unknown = sorted(set(given) - set(_CLASSIFIER_KEYS))
    if unknown:
        raise TypeError(
            f"classifier_parameters has unknown key(s) {unknown}; valid: "
            f"{[*_CLASSIFIER_KEYS, 'logits']}."
        )
    out = {**defaults, **given}
    for key in ("n_hidden", "n_layers"):
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"classifier_parameters[{key!r}]={value!r}: need an integer >= 0.")
    rate = out["dropout_rate"]
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < 1:
        raise ValueError(f"classifier_parameters['dropout_rate']={rate!r}: need 0 <= rate < 1.")
    return out


def _prior(y_prior, n_labels: int) -> torch.Tensor:
    """The class prior as a ``(1, K)`` tensor (uniform when None)."""
    if y_prior is None:
        return torch.full((1, n_labels), 1.0 / n_labels)
    prior = torch.as_tensor(y_prior, dtype=torch.float32).detach().cpu().reshape(1, -1)
    if prior.shape[1] != n_labels:
        raise ValueError(
            f"y_prior has {prior.shape[1]} values but there are {n_labels} label classes."
        )
    if not bool(torch.isfinite(prior).all()) or bool((prior <= 0).any()):
        raise ValueError(f"y_prior must hold finite values > 0; got {prior.tolist()[0]}.")
    if abs(float(prior.sum()) - 1.0) > 1e-4:
        raise ValueError(f"y_prior must sum to 1; it sums to {float(prior.sum()):.6g}.")
    return prior
