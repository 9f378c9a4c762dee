"""aftrec: multi-domain recommendation for the matching stage.

Built around AFT, "Adversarial Feature Translation for Multi-domain Recommendation"
(Hao et al., KDD 2021), with leakage-free multi-domain data preparation and
full-ranking per-domain evaluation.
"""

from aftrec.errors import AftrecError, CheckpointError, ConfigError, DataError

__version__ = "0.1.0"

__all__ = ["AftrecError", "CheckpointError", "ConfigError", "DataError", "__version__"]
