"""Built-in models; importing this package registers them."""

from aftrec.models import ease, popularity, two_tower  # noqa: F401
from aftrec.models.base import RetrievalModel

__all__ = ["RetrievalModel"]
