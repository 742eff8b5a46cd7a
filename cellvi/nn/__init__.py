"""Neural-network building blocks: FC stacks, encoders, decoders (plain ``nn.Module``)."""

from ._activations import HIDDEN_ACTIVATIONS, VARIANCE_ACTIVATIONS, activation_name
from ._decoder import CountDecoder
from ._encoder import Encoder
from ._fc import CovariateLinear, FCLayers

__all__ = [
    "HIDDEN_ACTIVATIONS",
    "VARIANCE_ACTIVATIONS",
    "CountDecoder",
    "CovariateLinear",
    "Encoder",
    "FCLayers",
    "activation_name",
]
