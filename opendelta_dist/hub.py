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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opendelta_dist.backends import full_numel
from opendelta_dist.errors import DeltaCheckpointError, DeltaConfigError, DeltaHubError
from opendelta_dist.operations import pristine_named_parameters
from opendelta_dist.saving import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, package_version

if TYPE_CHECKING:
    from opendelta_dist.basemodel import DeltaBase

LIBRARY_NAME = "opendelta-dist"
#: the files a delta checkpoint may consist of: this library's, OpenDelta 0.3.2's, PEFT's (a push replaces them all)
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
    weights: bool = True,
) -> Path:
    """The local directory of a delta checkpoint: ``path_or_repo_id`` itself, or the Hub repository's snapshot.

    Args:
        path_or_repo_id: a directory, or a Hub repository id (``"name"`` or ``"namespace/name"``).
        revision: a branch, tag or commit of the repository (default: ``main``).
        cache_dir: the Hub cache to use instead of the default one; as in OpenDelta, a directory
            ``cache_dir/path_or_repo_id`` that holds the checkpoint is read directly.
        token: a Hugging Face token (``True``: the saved one), for private or gated repositories.
        local_files_only: read the cache only (also set by ``HF_HUB_OFFLINE=1``, and by OpenDelta's
            ``DELTACENTER_OFFLINE=1``).
        force_download: download again even if the cache holds the files.
        subfolder: the checkpoint's folder inside the directory or repository.
        weights: fetch the weights too (else the configs only).

    Raises:
        DeltaHubError: no such directory and no such repository (or revision) reachable, or offline without a
            cached copy; the message names the repository and what to do.
        DeltaCheckpointError: ``path_or_repo_id`` is a file, or the repository holds no delta.
    """
    sub = _subfolder(subfolder)
    local = Path(path_or_repo_id).expanduser()
    if cache_dir is not None and (Path(cache_dir).expanduser() / local).is_dir():
        local = Path(cache_dir).expanduser() / local  # OpenDelta's cache_dir: a directory of checkpoints
    if local.is_dir():  # read as it is: its own errors name what is missing or corrupted
        return local / sub if sub else local
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
            "repository id ('name' or 'namespace/name'): pass the directory save_finetuned wrote, or a repository id"
        ) from None
    if os.environ.get("DELTACENTER_OFFLINE", "0") == "1":  # OpenDelta's switch for the same thing
        local_files_only = True
    where = f"Hub repository {repo_id!r}{_at(revision)}{f', subfolder {sub!r}' if sub else ''}"
    fetch = _Fetch(repo_id, revision, cache_dir, token, local_files_only, force_download, where)
    # the configs first: a repository without a delta (a model, say) is refused before its weights are fetched
    path = _inside(fetch(_in(sub, CONFIG_FILES)), sub, where)
    if weights:
        fetch(_in(sub, _weights_of(path)))
    return path


#: the configs of the formats a delta checkpoint may have: this library's and OpenDelta's, PEFT's
CONFIG_FILES = ("config.json", "adapter_config.json")


def _subfolder(subfolder: str | None) -> str:
    sub = (subfolder or "").strip("/")
    if ".." in Path(sub).parts:
        raise DeltaCheckpointError(
            f"subfolder {subfolder!r} leaves the checkpoint's directory: name a folder inside it"
        )
    return sub


def _in(sub: str, names: tuple[str, ...]) -> list[str]:
    return [f"{sub}/{name}" if sub else name for name in names]


def _weights_of(path: Path) -> tuple[str, ...]:
    """The weights files of the checkpoint whose configs are in ``path``."""
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        if "delta_type" in config:
            return (str(config.get("weights_file", WEIGHTS_NAME)), LEGACY_WEIGHTS_NAME)
    return ("adapter_model.safetensors", "adapter_model.bin")


class _NeverRaised(Exception):
    """Stands for an exception type that the installed huggingface_hub does not have."""


def _offline() -> bool:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1``)."""
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


def _inside(folder: Path, sub: str, where: str) -> Path:
    path = folder / sub if sub else folder
    if not _holds_delta(path):
        holds = sorted(p.name for p in path.iterdir())[:8] if path.is_dir() else []
        raise DeltaCheckpointError(
            f"{where} holds no delta: a delta checkpoint has a config.json with a delta_type (this library's "
            f"and OpenDelta's) or PEFT's adapter_config.json; found {holds or 'neither'} there. Pass the "
            "repository (or subfolder=) the delta was pushed to; a model repository is the backbone, loaded with "
            "from_pretrained"
        )
    return path


@dataclass(frozen=True)
class _Fetch:
    """``snapshot_download`` of some files of one repository revision, its errors said in this library's terms."""

    repo_id: str
    revision: str | None
    cache_dir: str | os.PathLike[str] | None
    token: str | bool | None
    local_files_only: bool
    force_download: bool
    where: str

    def __call__(self, patterns: list[str]) -> Path:
        from huggingface_hub import snapshot_download

        try:
            return Path(
                snapshot_download(
                    self.repo_id,
                    revision=self.revision,
                    cache_dir=self.cache_dir,
                    token=self.token,
                    local_files_only=self.local_files_only,
                    force_download=self.force_download,
                    allow_patterns=patterns,
                    library_name=LIBRARY_NAME,
                    library_version=package_version(),
                )
            )
        except Exception as exc:
            raise self._error(exc) from exc

    def _error(self, exc: Exception) -> Exception:
        from huggingface_hub import constants, errors

        name, cache = self.where, self.cache_dir or constants.HF_HUB_CACHE
        not_local = f"there is no directory {self.repo_id!r} here, and "
        incomplete = getattr(errors, "IncompleteSnapshotError", _NeverRaised)  # huggingface_hub 2.x
        if isinstance(exc, errors.GatedRepoError):
            return DeltaHubError(f"{name} is gated: ask for access on its page, then {_LOGIN} with that account")
        if isinstance(exc, errors.RepositoryNotFoundError):
            return DeltaHubError(
                f"{not_local}{name} was not found on {constants.ENDPOINT}: check the id, or, if it is private, "
                f"{_LOGIN} with access to it"
            )
        if isinstance(exc, errors.RevisionNotFoundError):
            return DeltaHubError(
                f"{name}: the repository has no such revision; pass an existing branch, tag or full commit id"
            )
        if isinstance(exc, errors.LocalTokenNotFoundError):
            return DeltaHubError(f"{name}: token=True asks for the saved token, and there is none: {_LOGIN}")
        if isinstance(exc, incomplete):
            return DeltaHubError(f"{name}: the cached copy is incomplete ({exc}); fetch it again online")
        http = exc if isinstance(exc, errors.HfHubHTTPError) else exc.__cause__
        if isinstance(http, errors.HfHubHTTPError) and http.response is not None:
            return DeltaHubError(f"{name}: {_http_reason(http)}")
        if isinstance(exc, errors.LocalEntryNotFoundError):
            if self.local_files_only or _offline():
                why = "downloads are off (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE or local_files_only=True)"
                fix = "download it once online"
                if self.revision and len(self.revision) < 40 and all(c in "0123456789abcdef" for c in self.revision):
                    fix += " (offline, a commit is found by its full 40-character id)"
            else:
                why = f"the Hub at {constants.ENDPOINT} cannot be reached ({exc.__cause__ or exc})"
                fix = "try again when it can"
            return DeltaHubError(
                f"{not_local}{name} is not in the Hub cache ({cache}) and {why}: {fix}, or pass the local directory "
                "of the checkpoint"
            )
        return DeltaHubError(f"{name} could not be downloaded: {type(exc).__name__}: {exc}")


def _http_reason(exc: Any) -> str:
    """What an HTTP error of the Hub means for the user (status, the Hub's own message, what to do)."""
    from huggingface_hub import constants

    status = exc.response.status_code
    said = exc.response.headers.get("X-Error-Message") or getattr(exc, "server_message", None) or ""
    said = f" (the Hub says: {said.strip()})" if said.strip() else ""
    if status == 401:
        return f"401 Unauthorized{said}: the token was refused, or the repository is private; {_LOGIN}"
    if status == 403:
        return f"403 Forbidden{said}: the token has no access to it; use a token that does"
    if status == 429:
        return f"429 Too Many Requests{said}: rate-limited by {constants.ENDPOINT}; wait and try again, logged in"
    if status >= 500:
        return f"{status} from {constants.ENDPOINT}{said}: the Hub failed; try again later"
    return f"HTTP {status}{said} from {constants.ENDPOINT}: {exc}"


# ------------------------------------------------------------------------------------------------- push


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
    peft_reason = _write_delta_files(delta, folder, saved)
    model_card(delta, repo_id, base_model_id(delta), peft_reason).save(folder / "README.md")
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def _write_delta_files(delta: DeltaBase, folder: Path, saved: Path | None) -> str | None:
    """The checkpoint and, for a LoRA that PEFT reads, PEFT's files; returns why PEFT cannot read it, or None."""
    if saved is None:
        delta.save_finetuned(folder)
    else:
        for name in ("config.json", WEIGHTS_NAME):
            shutil.copyfile(saved / name, folder / name)
    try:
        delta.save_peft(folder, base_model_name_or_path=base_model_id(delta))
    except DeltaConfigError as exc:  # PEFT reads LoRA adapters only, and not every LoRA of this library
        return "it reads LoRA adapters only" if delta.delta_type != "lora" else str(exc).split(";")[0]
    return None


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


def _cell(value: Any) -> str:
    """A value in a Markdown table cell: code, with the table's separator escaped."""
    return "`" + repr(value).replace("|", "\\|") + "`"


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
    options = "\n".join(f"| `{k}` | {_cell(v)} |" for k, v in delta.config.to_dict().items() if k != "delta_type")
    peft = (
        "PEFT reads the same repository:\n\n```python\nfrom peft import PeftModel\n\n"
        f'model = PeftModel.from_pretrained(backbone, "{repo_id}")\n```\n'
        if peft_reason is None
        else f"PEFT cannot read this delta: {peft_reason}.\n"
    )
    text = f"""---
{data.to_yaml()}
---

# {repo_id.split("/")[-1]}

A delta of type `{method}` ({type(delta).__name__}) for {base_text}, saved with {LIBRARY_NAME} {package_version()}.
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


def _hub_error(exc: Exception, repo_id: str) -> Exception:
    """A push's failure in this library's terms (``nothing was uploaded``); an unexpected one as it is."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    nothing = "nothing was uploaded"
    if isinstance(exc, LocalTokenNotFoundError):
        return DeltaHubError(f"cannot push to {repo_id!r} without a Hugging Face token: {_LOGIN}; {nothing}")
    if isinstance(exc, OfflineModeIsEnabled):
        return DeltaHubError(f"cannot push to {repo_id!r}: offline mode is on (HF_HUB_OFFLINE); {nothing}")
    if isinstance(exc, _connection_errors()):
        return DeltaHubError(
            f"the Hub at {constants.ENDPOINT} cannot be reached ({exc}); {nothing} to {repo_id!r}: push again when "
            "it is reachable"
        )
    if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code in (401, 403):
        return DeltaHubError(
            f"not allowed to create or write to {repo_id!r} ({exc.response.status_code}): {_LOGIN} with write access "
            f"to its namespace; {nothing}"
        )
    if isinstance(exc, HfHubHTTPError):
        return DeltaHubError(f"the Hub refused the upload to {repo_id!r}: {exc}; {nothing}")
    return exc


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


def push(delta: DeltaBase, repo_id: str, commit: HubCommit, saved: Path | None = None) -> Any:
    """Upload ``delta`` to ``repo_id`` (see :meth:`DeltaBase.push_to_hub`); returns huggingface_hub's ``CommitInfo``.

    The repository is created first (its full id, with the namespace, goes into the card), ``commit.revision``
    is created as a branch if it is missing, and the upload replaces every delta file the repository had that
    this delta does not write (a LoRA's PEFT files after an adapter is pushed over it, say).
    ``saved``: the directory ``save_finetuned`` just wrote, uploaded as it is (else the delta is saved anew).

    Raises:
        DeltaHubError: see :meth:`DeltaBase.push_to_hub`.
    """
    from huggingface_hub import HfApi

    check_push(repo_id)
    api = HfApi(token=commit.token, library_name=LIBRARY_NAME, library_version=package_version())
    with tempfile.TemporaryDirectory(prefix="opendelta-push-") as tmp:
        peft_reason = _write_delta_files(delta, Path(tmp), saved)  # before the repository is created
        try:
            full_id = api.create_repo(repo_id, private=commit.private, exist_ok=True).repo_id
            if commit.revision and not commit.create_pr:
                api.create_branch(full_id, branch=commit.revision, exist_ok=True)
            model_card(delta, full_id, base_model_id(delta), peft_reason).save(Path(tmp) / "README.md")
            names = sorted(p.name for p in Path(tmp).iterdir() if p.is_file())
            return api.upload_folder(
                repo_id=full_id,
                folder_path=tmp,
                commit_message=commit.commit_message or "Upload delta with opendelta-dist",
                revision=commit.revision,
                create_pr=commit.create_pr,
                delete_patterns=[name for name in DELTA_FILES if name not in names],
            )
        except Exception as exc:
            error = _hub_error(exc, repo_id)
            if error is exc:
                raise
            raise error from exc
