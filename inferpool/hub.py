"""Where a model or tokenizer named in a config comes from: a local directory, the local
Hugging Face cache, or the hub when it can be reached. Checked up front, so a name that is
none of these fails at once with an error naming the config field, instead of after the
hub client's download retries."""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from pathlib import Path

from inferpool.errors import ConfigError

_PROBE_TIMEOUT_S = 3.0


def _cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in ("config.json", "tokenizer_config.json", "tokenizer.json"):
        try:
            found = try_to_load_from_cache(name, filename)
        except Exception:  # not a valid repo id
            return False
        if isinstance(found, str):
            return True
    return False


@functools.lru_cache(maxsize=4)
def hub_reachable(endpoint: str) -> bool:
    """Whether the hub answers at all within a few seconds (remembered per process)."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=_PROBE_TIMEOUT_S)
    except urllib.error.HTTPError:
        return True  # it answered
    except Exception:
        return False
    return True


def _on_hub(name: str) -> bool | None:
    """Whether the hub has a model repository ``name`` (None: it could not tell)."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    except ImportError:
        return None
    try:
        HfApi().model_info(name, timeout=_PROBE_TIMEOUT_S)
    except (RepositoryNotFoundError, HFValidationError):
        return False
    except Exception:  # gated, rate-limited, slow: let the download itself decide
        return None
    return True


def check_model_source(name: str, field: str) -> None:
    """Raise ConfigError naming ``field`` unless ``name`` is a local path, is in the local
    Hugging Face cache, or is a model the hub (reachable) has."""
    if Path(name).expanduser().exists() or _cached(name):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if offline:
        why = "HF_HUB_OFFLINE is set"
    elif not hub_reachable(endpoint):
        why = f"the Hugging Face hub ({endpoint}) cannot be reached"
    elif _on_hub(name) is False:
        why = f"the Hugging Face hub ({endpoint}) has no model {name!r}"
    else:
        return
    raise ConfigError(
        f"{field}: {name!r} is neither a local path nor in the local Hugging Face cache, and {why}; "
        "give a local model directory (ip.tiny_model() builds one)",
        field=field.rsplit(".", 1)[-1],
    )
