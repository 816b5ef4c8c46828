"""Request feature encoding: the online store's state of a user and the request context -> the arrays every model
reads (`USER_INPUTS`), with the same encoders as training (`training.data.features`)."""
from __future__ import annotations

from typing import Any

import numpy as np

from training.data.features import FeatureSpace, encode_context, encode_history


def request_features(space: FeatureSpace, history: dict[str, Any], context: dict[str, Any],
                     now_s: float) -> dict[str, np.ndarray]:
    """The encoded request every model reads: `USER_INPUTS` arrays, each with one row.

    Args:
        history: the online store's state of the user ({items, actions, timestamps} oldest first).
        context: the request context (country, device, page, category, query; any may be missing).
        now_s: the request's time in unix seconds; action ages are measured against it.
    """
    items, actions, ages = encode_history(space, history["items"], history["actions"], history.get("timestamps"),
                                          now_s)
    ctx = encode_context(space, [context.get("country")], [context.get("device")], [context.get("page")],
                         [context.get("category")], [context.get("query")])
    return {"hist_items": items, "hist_actions": actions, "hist_ages": ages, "context": ctx}
