"""AFT (Hao et al., KDD 2021): generator, discriminator, ConvE and the registered variants
``aft``, ``aft-paper``, ``aft-d`` and ``aft-hnm``. See docs/aft.md for the paper-to-code map."""

from aftrec.models.aft.model import (
    AFT,
    AFTD,
    AFTHNM,
    AFTConfig,
    AFTDConfig,
    AFTHNMConfig,
    AFTPaper,
    AFTPaperConfig,
)

__all__ = [
    "AFT",
    "AFTD",
    "AFTHNM",
    "AFTConfig",
    "AFTDConfig",
    "AFTHNMConfig",
    "AFTPaper",
    "AFTPaperConfig",
]
