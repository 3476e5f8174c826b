"""Reading the fields of a request body the proxy relies on, with one set of rules.

Every field a provider module reads from a request body goes through these readers, so a
wrong type is a 400 in the provider's error shape that costs nothing (never a 500), and
every amount that reaches the hold is a bounded integer:

- the body of a metered request is a JSON object (``invalid_body``);
- ``model`` is a non-empty string (``missing_model``);
- a token limit (``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``,
  ``generationConfig.maxOutputTokens``, Bedrock ``inferenceConfig.maxTokens`` and the
  model-native ones) is absent, ``null``, or a JSON integer (not a boolean, not a float
  such as ``100.0``, not a string) from 1 to :data:`MAX_TOKEN_LIMIT` (``invalid_max_tokens``);
- a number of choices (``n``, ``best_of``, Gemini ``candidateCount``) is absent, ``null``,
  or a JSON integer from 1 to :data:`MAX_CHOICES` (``invalid_choices``);
- a flag (``stream``, ``stream_options.include_usage``) is absent, ``null`` or a boolean;
  an option (``service_tier``, ``speed``, ``inference_geo``, ...) is absent, ``null`` or a
  string; a section (``stream_options``, ``generationConfig``, ``inferenceConfig``,
  ``serviceTier``, ``performanceConfig``, ...) is absent, ``null`` or an object
  (``invalid_field``, naming the field).

A limit the request gives is carried in :class:`~proxy.providers.base.Call` as given; the
gate holds at most the model's own output cap per choice, times the number of choices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ProxyError

#: largest token limit accepted in a request (any real model's cap is far below it)
MAX_TOKEN_LIMIT = 2**31 - 1
#: largest number of choices (``n``, ``candidateCount``) accepted in a request
MAX_CHOICES = 128


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction or exponent"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _invalid(path: str, expected: str, value: Any, code: str = "invalid_field") -> ProxyError:
    return ProxyError(400, code, f"{path}: expected {expected}, got {_kind(value)}.")


def require_object(payload: Any) -> dict[str, Any]:
    """The request body, which must be a JSON object, or a 400 ``invalid_body``."""
    if not isinstance(payload, dict):
        raise ProxyError(400, "invalid_body", "The request body must be a JSON object.")
    return payload


def require_model(payload: Any) -> str:
    """The ``model`` field of a JSON request, or a 400 ``missing_model``."""
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, str) or not model:
        raise ProxyError(400, "missing_model", 'The request body must name a model in its "model" field.')
    return model


def _bounded(section: Mapping[str, Any], name: str, path: str, upper: int, code: str, what: str) -> int | None:
    value = section.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        shown = f"{value}" if isinstance(value, int | float) and not isinstance(value, bool) else _kind(value)
        raise ProxyError(400, code, f"{path}: {what} must be an integer from 1 to {upper:,} (got {shown}).")
    return value


def token_limit(section: Mapping[str, Any], *names: str, within: str = "") -> int | None:
    """The largest of the token limits ``names`` the section gives, or None if it gives
    none; a 400 ``invalid_max_tokens`` if any is not an integer from 1 to
    :data:`MAX_TOKEN_LIMIT`. The largest, because a request that names two is held for
    the more expensive reading."""
    found = [_bounded(section, n, within + n, MAX_TOKEN_LIMIT, "invalid_max_tokens", "a token limit") for n in names]
    given = [limit for limit in found if limit is not None]
    return max(given) if given else None


def choice_count(section: Mapping[str, Any], *names: str, within: str = "") -> int:
    """How many answers the request asks for: the largest of the counts ``names`` (1 if
    none is given); a 400 ``invalid_choices`` if any is not an integer from 1 to
    :data:`MAX_CHOICES`."""
    found = [_bounded(section, n, within + n, MAX_CHOICES, "invalid_choices", "a number of choices") for n in names]
    return max((count for count in found if count is not None), default=1)


def optional_bool(section: Mapping[str, Any], name: str, within: str = "") -> bool:
    """A flag: True only if given as ``true``; a 400 if given as anything but a boolean or null."""
    value = section.get(name)
    if value is not None and not isinstance(value, bool):
        raise _invalid(within + name, "true or false", value)
    return value is True


def optional_str(section: Mapping[str, Any], name: str, within: str = "") -> str | None:
    """An option given as a string (None if absent or null); a 400 if it is anything else."""
    value = section.get(name)
    if value is not None and not isinstance(value, str):
        raise _invalid(within + name, "a string", value)
    return value


def optional_object(section: Mapping[str, Any], name: str, within: str = "") -> dict[str, Any]:
    """A nested object (empty if absent or null); a 400 if it is anything else."""
    value = section.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(within + name, "an object", value)
    return value
