"""Built-in models; importing this package registers every model module in it.

Each module (or subpackage) of ``aftrec.models`` registers its models with
``@register_model`` at import time, so adding a model is adding a file.
"""

import importlib
import pkgutil

from aftrec.models.base import RetrievalModel

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["RetrievalModel"]
