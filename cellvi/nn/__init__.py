"""Neural-network building blocks: FC stacks, encoders, decoders (plain ``nn.Module``)."""

from ._decoder import CountDecoder
from ._encoder import Encoder
from ._fc import CovariateLinear, FCLayers

__all__ = ["CountDecoder", "CovariateLinear", "Encoder", "FCLayers"]
