"""Weights from the Hugging Face hub, with one clear error instead of a hub-client traceback.

Every family fetches its hub files through `fetch()`. It never retries for long: when the
hub cannot be reached (no network, a firewall, `HF_HUB_OFFLINE=1`) it answers from the local
cache or raises a `HubError` at once, naming the model page, the `HF_TOKEN` variable and the
offline alternative (`model.checkpoint=/path/to/weights`).
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cbmir.config import is_true
from cbmir.errors import CbmirError, reason

from .weights_file import file_identity

TOKEN_HELP = (
    "For a gated model, accept its terms on the model page while logged in, then export "
    "HF_TOKEN=<a read token from https://huggingface.co/settings/tokens>."
)
OFFLINE_HELP = (
    "Without network, point model.checkpoint=/path/to/weights (.safetensors, .bin/.pt/.pth "
    "state dict or a Lightning .ckpt) at a copy of the weights, or run with "
    "model.pretrained=false (random weights, for testing only)."
)


class HubError(CbmirError):
    """Weights that could not be fetched from the hub (gated, missing, offline)."""


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def model_page(repo_id: str) -> str:
    return f"https://huggingface.co/{repo_id}"


def offline() -> bool:
    """`HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) as the hub client reads it."""
    if any(is_true(os.environ.get(var, "")) for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):  # pragma: no cover - hub client missing or changed
        return False


@functools.lru_cache(maxsize=8)
def _reachable(url: str, timeout: float) -> bool:
    parsed = urlparse(url)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub, so that no network fails in seconds, not minutes of
    retries. Behind an HTTP(S) proxy the probe is skipped (the proxy decides)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    return _reachable(endpoint(), timeout)


def _hub_error(repo_id: str, what: str, reason: str, gated: bool) -> HubError:
    lines = [
        f"could not get {what} from the Hugging Face hub: {reason}.",
        f"Model page: {model_page(repo_id)}",
    ]
    if gated:
        lines.append("This model is gated. " + TOKEN_HELP)
    else:
        lines.append("If the repository is private or gated: " + TOKEN_HELP)
    lines.append(OFFLINE_HELP)
    return HubError("\n".join(lines))


@dataclass(frozen=True)
class HubFile:
    """A file fetched from the hub: its local path and which snapshot of which repo it is."""

    path: str
    repo_id: str
    filename: str

    @property
    def commit(self) -> str | None:
        """The snapshot commit, read from the cache layout `.../snapshots/<commit>/<file>`."""
        parts = Path(self.path).parts
        depth = len(Path(self.filename).parts)
        if len(parts) > depth + 1 and parts[-depth - 2] == "snapshots":
            return parts[-depth - 1]
        return None

    def identity(self) -> dict[str, Any]:
        """Repository, snapshot commit, file name, size and sha256: the store-key part."""
        ident = file_identity(self.path, source="hf-hub", repo=self.repo_id, revision=self.commit)
        ident["file"] = self.filename
        return ident


def cache_hint(path: str | os.PathLike) -> str:
    """How to drop a broken cached file so that the next run downloads it again."""
    path = Path(path)
    real = path.resolve()
    files = [str(path)] + ([str(real)] if real != path.absolute() else [])
    return (
        f"Remove it from the cache (rm {' '.join(files)}) and run again with network to "
        "download it afresh, or pass model.checkpoint=/path/to/a/good/copy."
    )


def fetch(
    repo_id: str,
    filenames: Sequence[str],
    *,
    gated: bool = False,
    revision: str | None = None,
    what: str | None = None,
) -> HubFile:
    """The first of `filenames` that `repo_id` has, fetched (cache first when offline).

    Raises `HubError` (a `CbmirError`) for a gated or missing repository, a missing file, or
    no network, with the model page and the `HF_TOKEN` variable in the message.
    """
    try:
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - a dependency of timm and open_clip
        raise HubError("huggingface_hub is not installed: pip install huggingface_hub") from exc

    what = what or f"the weights of {repo_id}"
    local_only = offline() or not reachable()
    missing: list[str] = []
    for filename in filenames:
        try:
            path = hf_hub_download(
                repo_id, filename, revision=revision, local_files_only=local_only
            )
            return HubFile(path=str(path), repo_id=repo_id, filename=filename)
        except hub_errors.GatedRepoError:
            raise _hub_error(
                repo_id,
                what,
                "the repository is gated and this token has no access to it (or no "
                "HF_TOKEN is set)",
                gated=True,
            ) from None
        except hub_errors.RepositoryNotFoundError:
            raise _hub_error(
                repo_id, what, "the repository does not exist or needs a token (HF_TOKEN)", gated
            ) from None
        except hub_errors.RevisionNotFoundError:
            raise _hub_error(repo_id, what, f"no revision {revision!r}", gated) from None
        except hub_errors.LocalEntryNotFoundError:
            if local_only:
                # offline: this file is not in the cache; another candidate might be
                missing.append(filename)
                continue
            raise _hub_error(repo_id, what, "the hub could not be reached", gated) from None
        except hub_errors.EntryNotFoundError:
            missing.append(filename)
            continue
        except hub_errors.HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise _hub_error(
                    repo_id, what, f"access denied (HTTP {status})", gated=True
                ) from None
            raise _hub_error(repo_id, what, f"HTTP error {status or ''}".strip(), gated) from None
        except (OSError, ValueError) as exc:  # connection errors, bad cache, bad repo id
            raise _hub_error(repo_id, what, reason(exc), gated) from None
    if local_only:
        why = (
            "HF_HUB_OFFLINE is set" if offline() else f"the hub ({endpoint()}) cannot be reached"
        ) + f" and none of {', '.join(filenames)} is in the local cache"
    else:
        why = f"the repository has none of {', '.join(filenames)}"
    raise _hub_error(repo_id, what, why, gated)
