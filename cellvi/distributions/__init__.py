"""Count distributions: NB, ZINB, Poisson, NB mixture, and the experimental Normal
(torch ``Distribution`` objects)."""

from ._counts import (
    NegativeBinomial,
    NegativeBinomialMixture,
    Poisson,
    ZeroInflatedNegativeBinomial,
)
from ._functional import log_mixture_nb, log_nb_positive, log_poisson, log_zinb_positive
from ._fused import nb_log_likelihood, poisson_log_likelihood, zinb_log_likelihood
from ._gammaless import (
    digamma_difference,
    log_factorial,
    log_gamma_ratio,
    nb_log_likelihood_gammaless,
    poisson_log_likelihood_gammaless,
    zinb_log_likelihood_gammaless,
)
from ._normal import Normal, log_normal_density

__all__ = [
    "NegativeBinomial",
    "NegativeBinomialMixture",
    "Normal",
    "Poisson",
    "ZeroInflatedNegativeBinomial",
    "digamma_difference",
    "log_factorial",
    "log_gamma_ratio",
    "log_mixture_nb",
    "log_nb_positive",
    "log_normal_density",
    "log_poisson",
    "log_zinb_positive",
    "nb_log_likelihood",
    "nb_log_likelihood_gammaless",
    "poisson_log_likelihood",
    "poisson_log_likelihood_gammaless",
    "zinb_log_likelihood",
    "zinb_log_likelihood_gammaless",
]
