"""The few per-family facts that a model's config and module tree cannot tell.

Keep this file small: everything else is read from the model (see ``inspect.py``).
"""

from __future__ import annotations

# Several families store a logit scale in a config field called ``logits_scaling``. The Granite
# families divide the LM-head output by it (``logits / logits_scaling``); HyperCLOVA X multiplies by it.
# Nothing in the config says which, so the multiplying families are listed here; every other
# ``model_type`` with the field divides.
LOGITS_SCALING_MULTIPLIES: frozenset[str] = frozenset({"hyperclovax", "hyperclovax_vision_v2"})
