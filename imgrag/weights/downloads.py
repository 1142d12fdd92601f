"""Fetching one role's files from the Hugging Face hub (``imgrag models download``), and what the command shows
around it: the cache folder, the free disk, whether the hub is switched off. imgrag never downloads during a run.

The hub client and its errors are imported inside :func:`download`: they take ~0.3 s to import, and ``imgrag --help``
imports this module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from huggingface_hub import constants

from imgrag.errors import UserError
from imgrag.weights.roles import ROLE_SETTING, RoleFiles


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder (``HF_HUB_CACHE``), read when called."""
    return Path(constants.HF_HUB_CACHE)


def free_disk_bytes(path: Path) -> int | None:
    """Free bytes on the disk that holds ``path`` (its nearest existing parent), None if unknown."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` switches the hub off (read when called)."""
    return bool(constants.HF_HUB_OFFLINE)


OFFLINE_HINT = ("fetch the files on a machine that can reach huggingface.co (`imgrag models download`) and copy its "
                "Hugging Face cache ({cache}) here, or point the profile at local folders")


def download(result: RoleFiles) -> Path:
    """Fetch one hub role's files into the HF cache (resumable; the hub client draws its progress bars).

    Raises :class:`UserError` in one line when the hub cannot be reached (``HF_HUB_OFFLINE=1``, no network),
    the repository does not exist or is gated, or files are still missing afterwards. Returns the snapshot folder.
    """
    import huggingface_hub
    from huggingface_hub import errors

    if not result.repo_id:
        raise UserError(f"{result.role} is not a hub repository ({result.ref}); nothing to download")
    setting = ROLE_SETTING[result.role] if result.source == "hub" else "models.generator_config"
    cache = hub_cache_dir()
    if hub_offline():
        raise UserError(f"cannot download {result.repo_id}: HF_HUB_OFFLINE=1 is set, so the model hub is off limits; "
                        "unset it, or " + OFFLINE_HINT.format(cache=cache))
    try:
        folder = huggingface_hub.snapshot_download(result.repo_id, allow_patterns=result.patterns)
    except (errors.GatedRepoError, errors.RepositoryNotFoundError) as exc:
        raise UserError(f"cannot download {result.repo_id}: {type(exc).__name__} (a typo in {setting}"
                        ", or a gated repository: accept its licence on huggingface.co and log in with `hf auth login`)"
                        ) from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError, TimeoutError) as exc:
        raise UserError(f"cannot reach the Hugging Face hub to download {result.repo_id} (no network?): "
                        + OFFLINE_HINT.format(cache=cache)) from exc
    except OSError as exc:
        if "connect" in str(exc).lower() or "resolve" in str(exc).lower():
            raise UserError(f"cannot reach the Hugging Face hub to download {result.repo_id} (no network?): "
                            + OFFLINE_HINT.format(cache=cache)) from exc
        raise UserError(f"download of {result.repo_id} failed: {exc}") from exc
    except Exception as exc:  # httpx transport errors and the like: the network, not the user
        if type(exc).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise UserError(f"cannot reach the Hugging Face hub to download {result.repo_id} (no network?): "
                            + OFFLINE_HINT.format(cache=cache)) from exc
        raise
    return Path(folder)
