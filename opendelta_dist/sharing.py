"""Saving, loading and sharing a delta: ``save_finetuned``, ``from_finetuned`` and ``push_to_hub``.

A mixin of :class:`~opendelta_dist.basemodel.DeltaBase`. The checkpoint's files are
:mod:`~opendelta_dist.saving`'s business, reading any kind of checkpoint is
:func:`~opendelta_dist.auto_delta.load_delta`'s, and the Hub is :mod:`~opendelta_dist.hub`'s.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opendelta_dist.auto_delta import load_delta
from opendelta_dist.errors import DeltaConfigError, warn_user
from opendelta_dist.hub import HubCommit, check_push, push
from opendelta_dist.saving import save_delta

if TYPE_CHECKING:
    from opendelta_dist.basemodel import DeltaBase
    from opendelta_dist.config import BaseDeltaConfig

#: OpenDelta 0.3.2's DeltaCenter options of ``save_finetuned``: accepted, and without effect
DELTACENTER_OPTIONS = (
    "center_args",
    "center_args_pool",
    "list_tags",
    "dict_tags",
    "delay_push",
    "test_result",
    "usage",
)


class DeltaSharing:
    """``save_finetuned``, ``from_finetuned`` and ``push_to_hub`` of every delta."""

    def save_finetuned(
        self: DeltaBase,  # type: ignore[misc]
        finetuned_delta_path: str | os.PathLike[str] = "./delta_checkpoints/",
        save_config: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        save_function: Callable[..., Any] | None = None,
        push_to_dc: bool = False,
        *,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        private: bool | None = None,
        commit_message: str | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **deltacenter_options: Any,
    ) -> Path:
        """Save the delta: ``config.json`` plus its tensors as safetensors (nothing of the backbone).

        Args:
            finetuned_delta_path: directory to write (created if missing). Files are replaced
                atomically; other files in it are left alone.
            save_config: write ``config.json`` (a checkpoint without it cannot be loaded by itself).
            state_dict: tensors to save instead of the delta's own (e.g. gathered by an engine),
                keyed as :meth:`named_delta_tensors`.
            save_function: OpenDelta's; the weights are always written as safetensors, so only
                ``None`` and ``torch.save`` are accepted.
            push_to_dc: OpenDelta's upload to its DeltaCenter, which is gone: the delta is saved
                locally and a warning says how to share it on the Hugging Face Hub instead.
            push_to_hub: after saving, upload the checkpoint (and a model card) to ``repo_id``, as
                :meth:`push_to_hub` does.
            repo_id: the repository to push to (default: the directory's name).
            private: as :meth:`push_to_hub`.
            commit_message: as :meth:`push_to_hub`.
            token: as :meth:`push_to_hub`.
            revision: as :meth:`push_to_hub`.
            create_pr: as :meth:`push_to_hub`.
            deltacenter_options: OpenDelta's other DeltaCenter options (``center_args``,
                ``list_tags``, ``usage``, ...): accepted and ignored.

        Returns:
            The checkpoint directory.

        Raises:
            DeltaConfigError: an unknown option, or a push without the config.
            DeltaHubError: the push failed (the local checkpoint is complete; nothing was uploaded).
        """
        unknown = sorted(set(deltacenter_options) - set(DELTACENTER_OPTIONS))
        if unknown:
            raise DeltaConfigError(f"save_finetuned() got unknown options {unknown}")
        if save_function not in (None, torch.save):
            raise DeltaConfigError(
                "save_finetuned writes safetensors and takes no save_function; save the tensors of "
                "delta.named_delta_tensors() yourself for another format"
            )
        path = Path(finetuned_delta_path)
        if push_to_hub:
            if not save_config:
                raise DeltaConfigError("a pushed delta needs its config.json: push with save_config=True")
            repo_id = repo_id or path.resolve().name
            check_push(repo_id)  # before anything is written
        save_delta(self, path, save_config=save_config, state_dict=state_dict)
        if push_to_dc:
            warn_user(
                f"OpenDelta's DeltaCenter is gone, so push_to_dc=True uploads nothing: the delta is saved in {path}. "
                "Share it on the Hugging Face Hub instead: save_finetuned(path, push_to_hub=True, repo_id='you/name') "
                "or delta.push_to_hub('you/name'); others load it with AutoDeltaModel.from_finetuned('you/name', ...)"
            )
        if push_to_hub:
            assert repo_id is not None
            push(self, repo_id, HubCommit(private, commit_message, token, revision, create_pr), saved=path)
        return path

    def push_to_hub(
        self: DeltaBase,  # type: ignore[misc]
        repo_id: str,
        private: bool | None = None,
        commit_message: str | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> Any:
        """Upload the delta to the Hugging Face Hub, with a model card, in one commit.

        The repository is created if it does not exist. It receives this library's checkpoint, PEFT's
        adapter files when the delta is a LoRA that PEFT can read, and a ``README.md`` whose metadata names
        the library, the base model (the backbone's ``config._name_or_path``, when it is a Hub id) and
        the method, and whose text shows how to load it. Others load it with
        ``AutoDeltaModel.from_finetuned(repo_id, backbone_model=...)``.

        Args:
            repo_id: ``"namespace/name"`` (or ``"name"`` in your own namespace).
            private: create the repository private (an existing one keeps its visibility).
            commit_message: the commit's message.
            token: a token with write access (default: the one ``hf auth login`` saved, or ``HF_TOKEN``).
            revision: the branch to commit to (default: ``main``; created from ``main`` if missing).
            create_pr: open a pull request instead of committing to the branch.

        Returns:
            huggingface_hub's ``CommitInfo``: a ``str``, the commit's URL, with ``.oid`` and, for ``create_pr``,
            ``.pr_url``.

        Raises:
            DeltaHubError: a malformed id, offline mode, no token or no write access, the Hub unreachable;
                nothing was uploaded then, and nothing is left on disk.
        """
        return push(self, repo_id, HubCommit(private, commit_message, token, revision, create_pr))

    @classmethod
    def from_finetuned(
        cls,
        finetuned_delta_path: str | os.PathLike[str],
        backbone_model: nn.Module,
        delta_config: BaseDeltaConfig | dict[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
        *,
        force_download: bool = False,
        check_hash: bool = True,
        local_files_only: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> DeltaBase:
        """Build the delta saved at ``finetuned_delta_path`` on ``backbone_model`` and load its tensors.

        The backbone is left in evaluation mode, as OpenDelta's ``from_finetuned`` (and transformers'
        ``from_pretrained``) leave it: call ``model.train()`` (and ``freeze_module``) to train on.

        Args:
            finetuned_delta_path: a directory written by ``save_finetuned`` (or by OpenDelta 0.3.2, or a PEFT
                LoRA adapter), or the id of a Hugging Face Hub repository holding one; a local directory of
                that name wins.
            backbone_model: the model to modify; it must be the backbone the delta was trained on.
            delta_config: a config to use instead of the checkpoint's ``config.json``.
            cache_dir: the Hub cache to download into instead of the default one (``HF_HUB_CACHE``).
            state_dict: the delta's tensors, to load instead of the checkpoint's weights file.
            force_download: download again even if the cache holds the files.
            check_hash: refuse a backbone whose structure or weights differ from the one the delta
                was saved with.
            local_files_only: read the Hub cache only (also set by ``HF_HUB_OFFLINE=1``).
            revision: a branch, tag or commit of the Hub repository (default: ``main``).
            token: a Hugging Face token for private or gated repositories (default: the saved one).
            subfolder: the checkpoint's folder inside the directory or repository.
            kwargs: options overriding those of the config.

        Raises:
            DeltaCheckpointError: the checkpoint is missing, corrupted or does not fit the backbone.
            DeltaHubError: the repository, its revision or a cached copy could not be found or reached.
            BackboneMismatchError: the backbone is not the one the delta was trained on.
        """
        return load_delta(
            finetuned_delta_path,
            backbone_model,
            expected_cls=cls,  # type: ignore[arg-type]
            delta_config=delta_config,
            check_hash=check_hash,
            cache_dir=cache_dir,
            state_dict=state_dict,
            force_download=force_download,
            local_files_only=local_files_only,
            revision=revision,
            token=token,
            subfolder=subfolder,
            **kwargs,
        )
