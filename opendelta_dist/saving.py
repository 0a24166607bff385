"""Delta checkpoints: ``config.json`` plus the delta's tensors in safetensors, and nothing else.

Layout of a checkpoint directory::

    config.json               the delta's options, delta_type, and bookkeeping: backbone class,
                              backbone checksum, the weights file's name and sha256, format version
    delta_model.safetensors   the delta's tensors, full and unsharded, keyed by backbone-relative names

Each file is written under a temporary name, flushed to disk, then renamed over the old one; the
weights first, the config last. The config records the weights' sha256, so a weights file that is
truncated, corrupted, or from an interrupted save is refused on load instead of being used.

The backbone checksum has two parts: ``backbone_hash`` (sha256 of the parameter names and shapes,
independent of dtype) and ``backbone_fingerprint`` (a few sampled values of every parameter, compared
with a tolerance that absorbs bf16/fp16 rounding). A delta trained in bf16 loads on an fp32 backbone;
a delta loaded on other weights is refused unless ``check_hash=False``.

OpenDelta 0.3.2's weights file (``pytorch_model.bin``) is read too, with
``torch.load(weights_only=True)``, which executes no code from the file.

This module reads and writes files and nothing else: turning a checkpoint into a delta (and another
library's checkpoint into this library's terms) is :mod:`~opendelta_dist.auto_delta`'s and the delta
methods' business. Every tensor is read and written whole, through the backend that made it
(:func:`opendelta_dist.backends.full_tensor`), so a sharded parameter is never saved or hashed as a
partition.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Collection, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from opendelta_dist.backends import backend_of, full_tensor
from opendelta_dist.errors import BackboneMismatchError, DeltaCheckpointError, WholeValueUnavailableError
from opendelta_dist.operations import pristine_named_parameters

if TYPE_CHECKING:
    from opendelta_dist.basemodel import DeltaBase

WEIGHTS_NAME = "delta_model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
FORMAT_VERSION = 1
SAMPLES_PER_TENSOR = 8
_RTOL = 2e-2  # bf16 keeps 8 significant bits: a relative error of at most 2**-8 per value


def sample_values(tensor: torch.Tensor) -> np.ndarray:
    """The values of the whole ``tensor`` that a fingerprint keeps (evenly spaced, as fp32)."""
    flat = tensor.detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, min(SAMPLES_PER_TENSOR, flat.numel()), device=flat.device).long()
    return flat[idx].float().cpu().numpy()


def backbone_checksum(
    backbone: nn.Module, replaced: Collection[str] = (), samples: Mapping[str, np.ndarray] | None = None
) -> tuple[str, np.ndarray]:
    """The backbone's structure hash and value fingerprint, ignoring attached deltas and dtype.

    Args:
        backbone: the model.
        replaced: names of parameters a delta trains as its own copies (e.g. a task head the delta
            saves): their values are left out of the fingerprint (NaN), so the delta also loads onto a
            backbone whose copy of them was initialised differently.
        samples: the values to fingerprint, by parameter name (:func:`sample_values` of the weights), where
            ``backbone`` does not hold them (an engine that trains another implementation of the model);
            a name without samples is left out (NaN).

    Returns:
        ``(sha256 hex of parameter names and shapes, float32 array of sampled parameter values)``; a value
        the backend cannot read whole here (a weight inside a BMTrain block) is not sampled (NaN).
    """
    structure = hashlib.sha256()
    kept: list[np.ndarray] = []
    for name, p in pristine_named_parameters(backbone):
        shape = backend_of(p).full_shape(p)
        structure.update(f"{name}:{tuple(shape)};".encode())
        missing = np.full(min(SAMPLES_PER_TENSOR, shape.numel()), np.nan, dtype=np.float32)
        if samples is not None:
            given = samples.get(name)
            kept.append(missing if given is None or name in replaced else given)
            continue
        try:
            whole = p if p.device.type == "meta" else full_tensor(p)
        except WholeValueUnavailableError:
            whole = None
        if whole is None or shape.numel() == 0 or whole.device.type == "meta" or name in replaced:
            kept.append(missing)
            continue
        kept.append(sample_values(whole))
    values = np.concatenate(kept) if kept else np.zeros(0, dtype=np.float32)
    return structure.hexdigest(), values


def _encode(values: np.ndarray) -> str:
    return base64.b64encode(values.astype("<f4").tobytes()).decode("ascii")


def _decode(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def check_backbone(config: dict[str, Any], backbone: nn.Module) -> None:
    """Refuse ``backbone`` if it is not the one the checkpoint's delta was saved with.

    Raises:
        BackboneMismatchError: structure or weights differ.
    """
    structure, values = backbone_checksum(backbone)
    saved_from = f"{config.get('backbone_class') or 'a model'}"
    if config.get("backbone_checkpoint_name"):
        saved_from += f" ({config['backbone_checkpoint_name']})"
    fix = "Load it onto that backbone, or pass check_hash=False to skip this check."
    if config.get("backbone_hash") != structure:
        raise BackboneMismatchError(
            f"this delta was saved on {saved_from}, whose parameter names and shapes differ from those of the "
            f"{type(backbone).__name__} it is being loaded onto. {fix}"
        )
    saved = _decode(config.get("backbone_fingerprint", ""))
    if saved.shape != values.shape:
        raise BackboneMismatchError(f"the backbone fingerprint in the checkpoint is malformed. {fix}")
    scale = np.nanmax(np.abs(saved)) if saved.size and not np.isnan(saved).all() else 1.0
    bad = ~(np.abs(values - saved) <= _RTOL * np.abs(saved) + 1e-3 * scale) & ~np.isnan(saved) & ~np.isnan(values)
    if bad.any():
        names = _names_at(backbone, np.flatnonzero(bad))
        raise BackboneMismatchError(
            f"this delta was saved on {saved_from} with other weights: {int(bad.sum())} of {bad.size} sampled "
            f"backbone values differ (first in: {', '.join(names[:3])}). {fix}"
        )


def _names_at(backbone: nn.Module, positions: np.ndarray) -> list[str]:
    names, bounds, total = [], [], 0
    for name, p in pristine_named_parameters(backbone):
        total += min(SAMPLES_PER_TENSOR, backend_of(p).full_shape(p).numel())
        names.append(name)
        bounds.append(total)
    hits = sorted({int(np.searchsorted(bounds, pos, side="right")) for pos in positions})
    return [names[i] for i in hits]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_file_mode() -> int:
    """The permissions a new file gets from this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temporary_beside(file: Path) -> tuple[int, str]:
    """A new temporary file next to ``file``, with the permissions a plain new file gets (``mkstemp`` makes it
    private to its owner, and the rename would keep that: teammates on a shared file system could not read it)."""
    fd, name = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
    os.fchmod(fd, _plain_file_mode())
    return fd, name


def write_json_atomic(file: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``file`` through a flushed temporary file and a rename."""
    fd, tmp_name = _temporary_beside(file)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, file)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> str:
    """Write ``tensors`` (copied to CPU, contiguous) as safetensors, atomically; return the file's sha256."""
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    fd, tmp_name = _temporary_beside(file)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(cpu, tmp, metadata=metadata)
        tmp.chmod(_plain_file_mode())  # safetensors writes the file anew
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        sha = _file_sha256(tmp)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
    return sha


def save_delta(
    delta: DeltaBase,
    path: Path,
    save_config: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    checksum: tuple[str, np.ndarray] | None = None,
    config_updates: dict[str, Any] | None = None,
) -> Path:
    """Write ``delta``'s checkpoint into ``path``; see the module docstring for the layout.

    Args:
        delta: the delta to save.
        path: the checkpoint directory.
        save_config: write ``config.json``.
        state_dict: the delta's full tensors when they are not its own parameters (gathered from shards).
        checksum: :func:`backbone_checksum` of the backbone, taken before an engine sharded it.
        config_updates: entries of ``config.json`` that differ from the delta's own (an engine that trains
            another implementation of the model saves for transformers' one: ``backend``, ``backbone_class``).

    Returns:
        ``path``.
    """
    tensors = {k: full_tensor(p) for k, p in delta.named_delta_tensors()} if state_dict is None else state_dict
    path.mkdir(parents=True, exist_ok=True)
    sha = write_safetensors_atomic(tensors, path / WEIGHTS_NAME, {"format": "pt", "delta_type": delta.delta_type})
    if save_config:
        if checksum is None:
            checksum = backbone_checksum(delta.backbone_model, delta.replaced_parameter_names())
        structure, values = checksum
        name_or_path = getattr(getattr(delta.backbone_model, "config", None), "_name_or_path", "") or None
        config = {
            **delta.config.to_dict(),
            "backbone_class": type(delta.backbone_model).__name__,
            "backbone_checkpoint_name": name_or_path,
            "backbone_hash": structure,
            "backbone_fingerprint": _encode(values),
            "weights_file": WEIGHTS_NAME,
            "weights_sha256": sha,
            "format_version": FORMAT_VERSION,
            "opendelta_dist_version": package_version(),
            **(config_updates or {}),
        }
        write_json_atomic(path / "config.json", config)
    _fsync_dir(path)
    return path


def package_version() -> str:
    """This library's installed version (``unknown`` in a source tree that was never installed)."""
    try:
        return version("opendelta-dist")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The dict in a checkpoint's ``config.json`` (``path`` is the directory or the file).

    Raises:
        DeltaCheckpointError: the file is missing or not a JSON object with a ``delta_type``.
    """
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise DeltaCheckpointError(f"no delta config at {file}: a delta checkpoint directory holds a config.json")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeltaCheckpointError(f"{file} is not valid JSON ({exc}); the checkpoint is corrupted") from exc
    if not isinstance(data, dict) or "delta_type" not in data:
        raise DeltaCheckpointError(f"{file} is not a delta config: it has no 'delta_type'")
    return data


def read_tensors(path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint directory ``path`` whose ``config.json`` holds ``config``.

    Raises:
        DeltaCheckpointError: no weights file, or one that is corrupted, does not match its recorded
            sha256, or (OpenDelta's pickle) holds anything but tensors.
    """
    weights = path / config.get("weights_file", WEIGHTS_NAME)
    legacy = path / LEGACY_WEIGHTS_NAME
    if weights.is_file():
        expected = config.get("weights_sha256")
        if expected is not None and _file_sha256(weights) != expected:
            raise DeltaCheckpointError(
                f"{weights} does not match the sha256 recorded in its config.json: the file is truncated or "
                "corrupted, or a save into this directory was interrupted. Save the delta again."
            )
        try:
            return load_file(weights)
        except (SafetensorError, OSError) as exc:
            raise DeltaCheckpointError(f"{weights} is truncated or corrupted ({exc}); save the delta again") from exc
    if legacy.is_file():
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad or unsafe pickle
            raise DeltaCheckpointError(
                f"{legacy} could not be read as a plain tensor state dict ({type(exc).__name__}: {exc}); only "
                "files holding tensors are loaded, never arbitrary pickled objects"
            ) from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise DeltaCheckpointError(f"{legacy} does not hold a dict of tensors")
        return state
    raise DeltaCheckpointError(
        f"no delta weights in {path}: expected {WEIGHTS_NAME} (or OpenDelta's {LEGACY_WEIGHTS_NAME})"
    )


def load_delta_tensors(delta: DeltaBase, tensors: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
    """Copy ``tensors`` into ``delta``'s parameters (cast to their dtype and device).

    Raises:
        DeltaCheckpointError: keys are missing or unexpected, or shapes differ.
    """
    own = dict(delta.named_delta_tensors())
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise DeltaCheckpointError(
            f"the tensors in {source} do not fit the {delta.delta_type!r} delta built from its config: "
            f"{'; '.join(parts)}. The checkpoint belongs to another backbone or delta configuration."
        )
    for key, param in own.items():
        value = tensors[key]
        if tuple(value.shape) != tuple(backend_of(param).full_shape(param)):
            raise DeltaCheckpointError(
                f"tensor {key!r} in {source} has shape {tuple(value.shape)}, the delta expects "
                f"{tuple(backend_of(param).full_shape(param))}"
            )
    for key, param in own.items():
        backend_of(param).load_full(param, tensors[key])
