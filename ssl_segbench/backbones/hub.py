"""Checkpoint files through the Hugging Face cache, for every loader: one file fetched with an at-once error when the
Hub cannot be reached (`hub_file`), that error worded by why (`offline_hint`), the commit the cache serves, and a
damaged file named before a library fails on it (`verify_checkpoint_files`)."""
from __future__ import annotations

import json
from pathlib import Path

from ..paths import hub_offline
from ..registry import BackboneSpec
from .base import BackboneError
from .weights import verify_config_files

# exception class names that mean "no connection" (httpx, httpx2 and requests alike), as opposed to an answer from the
# Hub (not found, gated, unauthorised); LocalEntryNotFoundError is huggingface_hub's own "unreachable and not cached"
_UNREACHABLE = ("ConnectError", "ConnectionError", "TransportError", "Timeout", "TimeoutError", "TimeoutException",
                "LocalEntryNotFoundError")


def _unreachable(err: BaseException | None) -> bool:
    """Whether a Hub failure, or one it was raised from (transformers wraps the Hub's errors), is a failed
    connection."""
    seen = 0
    while err is not None and seen < 5:
        if any(c.__name__ in _UNREACHABLE for c in type(err).__mro__):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def offline_hint(repo_id: str, revision: str | None, err: Exception,
                  spec: BackboneSpec | None = None) -> BackboneError:
    """The error for a Hub checkpoint the cache lacks, worded by why it could not be fetched: HF_HUB_OFFLINE set, the
    Hub not reachable (then how to run from a cached copy with HF_HUB_OFFLINE=1 and HF_HUB_CACHE), or the Hub's own
    answer (a mistyped repo or revision, a private or gated repo)."""
    from huggingface_hub import constants

    where = f"{repo_id}@{revision}" if revision else repo_id
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    cached = f"not in the Hugging Face cache (HF_HUB_CACHE={constants.HF_HUB_CACHE})"
    copy = (f"point HF_HUB_CACHE at a cache that holds it (run `{download}` on a machine with network and copy that "
            "cache here)")
    if hub_offline():
        why = (f"it is {cached} and HF_HUB_OFFLINE is set, so the Hub was not asked. To fix it, {copy}, or unset "
               "HF_HUB_OFFLINE to download it.")
    elif _unreachable(err):
        why = (f"the Hugging Face Hub ({constants.ENDPOINT}) could not be reached and the checkpoint is {cached}. "
               f"To work without network, {copy} and set HF_HUB_OFFLINE=1, so that no connection is tried.")
    else:
        why = (f"it is {cached} and the Hub did not serve it: check the repo id and revision; a private or gated "
               "repo needs `hf auth login` first.")
    gated = ""
    if spec is not None and spec.gated:
        gated = (f" The Hub copy is gated ({spec.license}): accept its license at {spec.license_url} while logged in "
                 f"to the Hub, then `hf auth login` with a token of that account, then `{download}`.")
    return BackboneError(f"checkpoint {where} could not be loaded: {why}{gated}\n({type(err).__name__}: {err})")


def verify_checkpoint_files(directory: Path, fix: str = "replace it with a complete copy") -> None:
    """Check every safetensors file of a checkpoint directory against its own header (JSON length, then the byte
    range of every tensor) and parse its JSON files: a truncated or damaged download is named here, before a library
    fails deep inside."""
    verify_config_files(directory, fix)
    for f in sorted(Path(directory).glob("*.safetensors")):
        size = f.stat().st_size
        problem = None
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or 8 + n > size:
                problem = f"it has {size} bytes, too few for its header"
            else:
                try:
                    header = json.loads(fh.read(n))
                    end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
                except (ValueError, KeyError, TypeError, IndexError):
                    problem = "its header is not valid safetensors JSON"
                else:
                    if size < 8 + n + end:
                        problem = f"it has {size} bytes but its header declares {8 + n + end} (truncated)"
        if problem:
            raise BackboneError(f"checkpoint file {f} is damaged: {problem}. To fix it, {fix}.")


def repair_hint(spec: BackboneSpec) -> str:
    """How to replace a damaged checkpoint file: a local directory's own copy, or the Hub download."""
    if Path(spec.repo_id.removeprefix("local-dir:")).is_dir():
        return "replace it with a complete copy of the checkpoint"
    rev = f" --revision {spec.revision}" if spec.revision else ""
    return f"delete it and download the checkpoint again: `hf download {spec.repo_id}{rev}`"


def hub_file(repo_id: str, filename: str, revision: str | None, spec: BackboneSpec | None = None) -> Path:
    """One file of a Hub checkpoint through the Hugging Face cache (`hf_hub_download`). A file the cache lacks is
    first asked for with one metadata request, which huggingface_hub makes without retrying: when the Hub cannot be
    reached, that is the error at once (`offline_hint`), instead of the library's 5 retries with backoff (about
    25 s) for each missing file. Under HF_HUB_OFFLINE the library contacts no one, so there is nothing to ask."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

    if not hub_offline() and try_to_load_from_cache(repo_id, filename, revision=revision) is None:
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision))
        except Exception as e:  # noqa: BLE001 - an answer (not found, gated) is left to hf_hub_download's own error
            if _unreachable(e):
                raise offline_hint(repo_id, revision, e, spec) from e
    return Path(hf_hub_download(repo_id, filename, revision=revision))


def resolve_revision(repo_id: str, revision: str | None, filename: str = "config.json",
                     spec: BackboneSpec | None = None) -> str:
    """The commit sha the cache serves for (repo_id, revision), from the snapshot path of one of its files (`spec`:
    the registry entry, for the gated-license hint)."""
    return hub_file(repo_id, filename, revision, spec).parent.name


def is_hub_error(e: Exception) -> bool:
    """Whether a library's failure came from the Hub or the cache (then `offline_hint` words it)."""
    mod = type(e).__module__ or ""
    return isinstance(e, OSError) or mod.startswith("huggingface_hub") or "NotFound" in type(e).__name__


def config_name(spec: BackboneSpec, snapshot: Path | None) -> str:
    """The config file a checkpoint's model is built from, for messages."""
    return str(snapshot / "config.json") if snapshot is not None else f"the config.json of {spec.repo_id}"
