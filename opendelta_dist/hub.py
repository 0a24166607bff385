"""Sharing deltas on the Hugging Face Hub: pull a checkpoint by repository id, push one with a model card.

Pulling goes through ``huggingface_hub.snapshot_download``, as transformers' ``from_pretrained`` does: the
files land in the Hub cache (``HF_HUB_CACHE``, ``~/.cache/huggingface/hub``, or ``cache_dir``), offline mode
(``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) reads that cache only, and ``token`` opens private
repositories. Only a delta's files are fetched (a model repository that also holds a delta in a
``subfolder`` is not downloaded whole). A local directory of that name wins over a repository.

Pushing stages the delta in a temporary directory (this library's checkpoint, PEFT's adapter files where
the delta is a LoRA that PEFT can read, and a ``README.md`` model card) and uploads it in one commit with
``HfApi.upload_folder``. Errors of either direction are :class:`~opendelta_dist.errors.DeltaHubError`
naming the repository and what to do; nothing is left half-written.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opendelta_dist.backends import full_numel
from opendelta_dist.errors import DeltaCheckpointError, DeltaConfigError, DeltaHubError
from opendelta_dist.operations import pristine_named_parameters
from opendelta_dist.saving import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

if TYPE_CHECKING:
    from opendelta_dist.basemodel import DeltaBase

LIBRARY_NAME = "opendelta-dist"
#: the files a delta checkpoint may consist of: this library's, OpenDelta 0.3.2's, PEFT's
DELTA_FILES = (
    "config.json",
    WEIGHTS_NAME,
    LEGACY_WEIGHTS_NAME,
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
_LOGIN = "log in with `hf auth login` (or set HF_TOKEN), or pass token="


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    subfolder: str | None = None,
) -> Path:
    """The local directory of a delta checkpoint: ``path_or_repo_id`` itself, or the Hub repository's snapshot.

    Args:
        path_or_repo_id: a directory, or a Hub repository id (``"name"`` or ``"namespace/name"``).
        revision: a branch, tag or commit of the repository (default: ``main``).
        cache_dir: the Hub cache to use instead of the default one.
        token: a Hugging Face token (``True``: the saved one), for private or gated repositories.
        local_files_only: read the cache only (also set by ``HF_HUB_OFFLINE=1``, and by OpenDelta's
            ``DELTACENTER_OFFLINE=1``).
        force_download: download again even if the cache holds the files.
        subfolder: the checkpoint's folder inside the directory or repository.

    Raises:
        DeltaHubError: no such directory and no such repository (or revision) reachable, or offline without a
            cached copy; the message names the repository and what to do.
        DeltaCheckpointError: ``path_or_repo_id`` is a file, or the repository holds no delta.
    """
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():  # read as it is: its own errors name what is missing or corrupted
        return local / subfolder if subfolder else local
    if local.exists():
        raise DeltaCheckpointError(
            f"{local} is a file; a delta checkpoint is the directory that holds config.json and the weights"
        )
    repo_id = str(path_or_repo_id)
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise DeltaHubError(
            f"{repo_id}: no such directory{'' if local.is_absolute() else f' (in {Path.cwd()})'}, and not a Hub "
            "repository id, which is "
            "'name' or 'namespace/name': pass the directory save_finetuned wrote, or a repository id"
        ) from None
    if os.environ.get("DELTACENTER_OFFLINE", "0") == "1":  # OpenDelta's switch for the same thing
        local_files_only = True
    snapshot = _download(repo_id, revision, cache_dir, token, local_files_only, force_download, subfolder)
    return _inside(snapshot, subfolder, f"Hub repository {repo_id!r}{_at(revision)}")


class _NeverRaised(Exception):
    """Stands for an exception type that the installed huggingface_hub does not have."""


def _offline() -> bool:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return bool(getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)())


def _at(revision: str | None) -> str:
    return f" (revision {revision!r})" if revision else ""


def _holds_delta(path: Path) -> bool:
    if (path / "adapter_config.json").is_file():
        return True
    try:
        return "delta_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _inside(folder: Path, subfolder: str | None, where: str) -> Path:
    path = folder / subfolder if subfolder else folder
    if not _holds_delta(path):
        holds = sorted(p.name for p in path.iterdir())[:8] if path.is_dir() else []
        raise DeltaCheckpointError(
            f"{where}{f', subfolder {subfolder!r}' if subfolder else ''} holds no delta: a delta checkpoint has a "
            f"config.json with a delta_type and its weights ({WEIGHTS_NAME}, or OpenDelta's {LEGACY_WEIGHTS_NAME}) "
            f"or PEFT's adapter_config.json; found {holds or 'nothing'}. Pass the repository (or subfolder=) the "
            "delta was pushed to; a model repository is the backbone, loaded with from_pretrained"
        )
    return path


def _download(
    repo_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    token: str | bool | None,
    local_files_only: bool,
    force_download: bool,
    subfolder: str | None,
) -> Path:
    from huggingface_hub import constants, errors, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # a cached copy that misses files, read offline (huggingface_hub 2.x tells it apart)
    incomplete: type[Exception] = getattr(errors, "IncompleteSnapshotError", _NeverRaised)

    patterns = [f"{subfolder.strip('/')}/{name}" if subfolder else name for name in DELTA_FILES]
    name = f"Hub repository {repo_id!r}{_at(revision)}"
    not_local = f"there is no directory {repo_id!r} here, and "
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            force_download=force_download,
            allow_patterns=patterns,
            library_name=LIBRARY_NAME,
            library_version=package_version(),
        )
    except GatedRepoError as exc:
        raise DeltaHubError(
            f"{name} is gated: ask for access on {constants.ENDPOINT}/{repo_id}, then {_LOGIN} with that account"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise DeltaHubError(
            f"{not_local}{name} was not found on {constants.ENDPOINT}: check the id, or, if it is private, {_LOGIN} "
            "with access to it"
        ) from exc
    except RevisionNotFoundError as exc:
        raise DeltaHubError(
            f"{name}: the repository has no such revision; pass an existing branch, tag or commit as revision="
        ) from exc
    except incomplete as exc:
        raise DeltaHubError(
            f"{name}: the cached copy misses files and the Hub cannot be reached; download it again online"
        ) from exc
    except LocalEntryNotFoundError as exc:
        offline = local_files_only or _offline()
        why = (
            "downloads are off (HF_HUB_OFFLINE=1 or local_files_only=True)"
            if offline
            else f"the Hub at {constants.ENDPOINT} cannot be reached ({exc.__cause__ or exc})"
        )
        raise DeltaHubError(
            f"{not_local}{name} is not in the Hub cache ({cache_dir or constants.HF_HUB_CACHE}) and {why}: download "
            "it once online (unset HF_HUB_OFFLINE), or pass the local directory of the checkpoint"
        ) from exc
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code in (401, 403):  # private: the Hub answers 401
            raise DeltaHubError(
                f"{not_local}{name} was not found on {constants.ENDPOINT} or is private "
                f"({exc.response.status_code}): check the id, or {_LOGIN} with access to it"
            ) from exc
        raise DeltaHubError(f"{name} could not be downloaded: {exc}") from exc
    return Path(folder)


# ------------------------------------------------------------------------------------------------- push


def package_version() -> str:
    """This library's installed version (``unknown`` in a source tree that was never installed)."""
    try:
        return version(LIBRARY_NAME)
    except PackageNotFoundError:
        return "unknown"


def check_push(repo_id: str) -> None:
    """Refuse a push that cannot happen, before anything is written: a malformed id, or offline mode.

    Raises:
        DeltaHubError: naming the problem.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise DeltaHubError(f"{repo_id!r} is not a Hub repository id ('name' or 'namespace/name'): {exc}") from None
    if _offline():
        raise DeltaHubError(
            f"cannot push to {repo_id!r}: HF_HUB_OFFLINE is set, so huggingface_hub makes no request; unset it to push"
        )


def write_upload_folder(delta: DeltaBase, folder: Path, repo_id: str, saved: Path | None = None) -> list[str]:
    """Write into ``folder`` exactly what :func:`push` uploads; returns the file names.

    The delta's checkpoint (copied from ``saved``, a directory ``save_finetuned`` just wrote, or saved
    anew), PEFT's ``adapter_config.json`` and ``adapter_model.safetensors`` when the delta is a LoRA that
    PEFT's format holds, and ``README.md``: a model card whose metadata names the library, the base model,
    the method and tags, and whose text says how to load the delta.
    """
    if saved is None:
        delta.save_finetuned(folder)
    else:
        for name in ("config.json", WEIGHTS_NAME):
            shutil.copyfile(saved / name, folder / name)
    base = base_model_id(delta)
    peft_reason = None
    try:
        delta.save_peft(folder, base_model_name_or_path=base)
    except DeltaConfigError as exc:
        peft_reason = str(exc)
    model_card(delta, repo_id, base, peft_reason).save(folder / "README.md")
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def base_model_id(delta: DeltaBase) -> str | None:
    """The backbone's Hub id (its ``config._name_or_path``), when it is one and not a local path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    name = getattr(getattr(delta.backbone_model, "config", None), "_name_or_path", "") or ""
    if not name or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def model_card(delta: DeltaBase, repo_id: str, base: str | None, peft_reason: str | None) -> Any:
    """The ``README.md`` of a pushed delta, as a ``huggingface_hub.ModelCard``."""
    from huggingface_hub import ModelCard, ModelCardData

    method = delta.delta_type
    tags = [LIBRARY_NAME, "delta-tuning", method, *([] if peft_reason else ["peft", "lora"])]
    data = ModelCardData(library_name=LIBRARY_NAME, base_model=base, tags=list(dict.fromkeys(tags)))
    backbone_cls = type(delta.backbone_model).__name__
    base_text = f"`{base}`" if base else f"the `{backbone_cls}` it was trained on (its Hub id was not recorded)"
    load_base = f'"{base}"' if base else '"<the backbone it was trained on>"'
    size = sum(full_numel(p) for _, p in delta.named_delta_tensors())
    total = max(sum(full_numel(p) for _, p in pristine_named_parameters(delta.backbone_model)), 1)
    options = "\n".join(f"| `{k}` | `{v!r}` |" for k, v in delta.config.to_dict().items() if k != "delta_type")
    peft = (
        "PEFT reads the same repository:\n\n```python\nfrom peft import PeftModel\n\n"
        f'model = PeftModel.from_pretrained(backbone, "{repo_id}")\n```\n'
        if peft_reason is None
        else f"PEFT cannot read this delta: {peft_reason}\n"
    )
    text = f"""---
{data.to_yaml()}
---

# {repo_id.split("/")[-1]}

A `{method}` delta ({type(delta).__name__}) for {base_text}, saved with {LIBRARY_NAME} {package_version()}.
It holds {size:,} parameters, {100 * size / total:.3g}% as many as the backbone; the backbone itself is loaded from
its own repository.

## Use it

```python
from transformers import {backbone_cls}
from opendelta_dist import AutoDeltaModel

backbone = {backbone_cls}.from_pretrained({load_base})
delta = AutoDeltaModel.from_finetuned("{repo_id}", backbone_model=backbone)
```

{peft}
## The delta

| option | value |
|---|---|
{options}
"""
    return ModelCard(text)


@dataclass(frozen=True)
class HubCommit:
    """How a push commits: the options of :meth:`~opendelta_dist.basemodel.DeltaBase.push_to_hub`."""

    private: bool | None = None
    commit_message: str | None = None
    token: str | bool | None = None
    revision: str | None = None
    create_pr: bool = False


def upload(folder: Path, repo_id: str, commit: HubCommit) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it in one commit; returns the commit's URL.

    Raises:
        DeltaHubError: no token, no write access, the Hub unreachable or refusing the upload.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    api = HfApi(token=commit.token, library_name=LIBRARY_NAME, library_version=package_version())
    nothing = "nothing was uploaded"
    try:
        api.create_repo(repo_id, private=commit.private, exist_ok=True)
        done = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit.commit_message or "Upload delta with opendelta-dist",
            revision=commit.revision,
            create_pr=commit.create_pr,
        )
    except LocalTokenNotFoundError as exc:
        raise DeltaHubError(f"cannot push to {repo_id!r} without a Hugging Face token: {_LOGIN}; {nothing}") from exc
    except OfflineModeIsEnabled as exc:
        raise DeltaHubError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE is set; unset it to push; {nothing}") from exc
    except _connection_errors() as exc:
        raise DeltaHubError(
            f"the Hub at {constants.ENDPOINT} cannot be reached ({exc}); {nothing} to {repo_id!r}: push again when "
            "it is reachable"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise DeltaHubError(
                f"not allowed to create or write to {repo_id!r} ({status}): {_LOGIN} with write access to its "
                f"namespace; {nothing}"
            ) from exc
        raise DeltaHubError(f"the Hub refused the upload to {repo_id!r}: {exc}; {nothing}") from exc
    return str(done.pr_url or done.commit_url)


def _connection_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of an unreachable Hub: huggingface_hub's HTTP client raises its own (httpx2's in
    huggingface_hub 2, httpx's in 1)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found += [getattr(module, n) for n in ("ConnectError", "TimeoutException") if hasattr(module, n)]
    return tuple(found)


def push(delta: DeltaBase, repo_id: str, commit: HubCommit, saved: Path | None = None) -> str:
    """Upload ``delta`` to ``repo_id`` (see :meth:`DeltaBase.push_to_hub`); returns the commit's URL.

    ``saved``: the directory ``save_finetuned`` just wrote, uploaded as it is (else the delta is saved anew).
    """
    check_push(repo_id)
    with tempfile.TemporaryDirectory(prefix="opendelta-push-") as tmp:
        write_upload_folder(delta, Path(tmp), repo_id, saved)
        return upload(Path(tmp), repo_id, commit)
