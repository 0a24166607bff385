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

OpenDelta 0.3.2 checkpoints (``config.json`` + ``pytorch_model.bin``) load too; their tensors are
read with ``torch.load(weights_only=True)``, which executes no code from the file. So do HF PEFT
LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``, see :mod:`~opendelta_dist.peft_format`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from opendelta_dist.auto_delta import delta_method, read_config_file
from opendelta_dist.config import BaseDeltaConfig
from opendelta_dist.errors import BackboneMismatchError, DeltaCheckpointError, DeltaConfigError
from opendelta_dist.operations import pristine_named_parameters
from opendelta_dist.structure import OPENDELTA_ROLES, role_keys

if TYPE_CHECKING:
    from opendelta_dist.basemodel import DeltaBase

WEIGHTS_NAME = "delta_model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
FORMAT_VERSION = 1
SAMPLES_PER_TENSOR = 8
_RTOL = 2e-2  # bf16 keeps 8 significant bits: a relative error of at most 2**-8 per value


def backbone_checksum(backbone: nn.Module, replaced: Collection[str] = ()) -> tuple[str, np.ndarray]:
    """The backbone's structure hash and value fingerprint, ignoring attached deltas and dtype.

    Args:
        backbone: the model.
        replaced: names of parameters a delta trains as its own copies (e.g. a task head the delta
            saves): their values are left out of the fingerprint (NaN), so the delta also loads onto a
            backbone whose copy of them was initialised differently.

    Returns:
        ``(sha256 hex of parameter names and shapes, float32 array of sampled parameter values)``.
    """
    structure = hashlib.sha256()
    samples: list[np.ndarray] = []
    for name, p in pristine_named_parameters(backbone):
        structure.update(f"{name}:{tuple(p.shape)};".encode())
        flat = p.detach().reshape(-1)
        if flat.numel() == 0 or flat.device.type == "meta" or name in replaced:
            samples.append(np.full(min(SAMPLES_PER_TENSOR, flat.numel()), np.nan, dtype=np.float32))
            continue
        idx = torch.linspace(0, flat.numel() - 1, min(SAMPLES_PER_TENSOR, flat.numel()), device=flat.device).long()
        samples.append(flat[idx].float().cpu().numpy())
    values = np.concatenate(samples) if samples else np.zeros(0, dtype=np.float32)
    return structure.hexdigest(), values


def replaced_parameter_names(delta: DeltaBase) -> set[str]:
    """Names of the backbone parameters ``delta`` trains as its own copies (``unfrozen_modules``, BitFit)."""
    return {f"{module}.{param}" if module else param for module, param in delta._unfrozen}


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
        total += min(SAMPLES_PER_TENSOR, p.numel())
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


def write_json_atomic(file: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``file`` through a flushed temporary file and a rename."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(cpu, tmp, metadata=metadata)
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
) -> Path:
    """Write ``delta``'s checkpoint into ``path``; see the module docstring for the layout.

    Args:
        delta: the delta to save.
        path: the checkpoint directory.
        save_config: write ``config.json``.
        state_dict: the delta's full tensors when they are not its own parameters (gathered from shards).
        checksum: :func:`backbone_checksum` of the backbone, taken before an engine sharded it.

    Returns:
        ``path``.
    """
    tensors = dict(delta.named_delta_tensors()) if state_dict is None else state_dict
    path.mkdir(parents=True, exist_ok=True)
    sha = write_safetensors_atomic(tensors, path / WEIGHTS_NAME, {"format": "pt", "delta_type": delta.delta_type})
    if save_config:
        from opendelta_dist import __version__

        if checksum is None:
            checksum = backbone_checksum(delta.backbone_model, replaced_parameter_names(delta))
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
            "opendelta_dist_version": __version__,
        }
        write_json_atomic(path / "config.json", config)
    _fsync_dir(path)
    return path


def _read_tensors(path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
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


def _from_opendelta(config: dict[str, Any], backbone: nn.Module) -> dict[str, Any]:
    """Options of an OpenDelta 0.3.2 config in this library's terms, on ``backbone``."""
    options = dict(config)
    modules = options.get("modified_modules")
    if options.get("delta_type") == "parallel_adapter" and isinstance(modules, list) and len(modules) % 2 == 0:
        # OpenDelta lists parallel adapters as consecutive (first, last) module pairs
        pairs = zip(modules[::2], modules[1::2], strict=True)
        options["modified_modules"] = [a if a == b else [a, b] for a, b in pairs]
    if options.get("delta_type") == "bitfit" and isinstance(modules, list):
        options["modified_modules"] = [m for m in modules if m != "lm_head@.proj@"]  # OpenDelta never matched it
    if "scaled" in options and options["scaled"] is None:
        del options["scaled"]  # OpenDelta saved its parallel adapter's scale as null
    if options.get("delta_type") == "soft_prompt":
        options.pop("modified_modules", None)  # OpenDelta saved a placeholder ["root"]
        options["common_structure"] = False
    if options.get("delta_type") == "prefix":
        options["reparameterize"] = False  # the per-layer prefixes are read as they are (see _opendelta_tensors)
    if options.get("common_structure") and isinstance(options.get("modified_modules"), list):
        # roles become explicit module keys, placed where OpenDelta placed them (a span's ends one each)
        keys: list[Any] = []
        for item in options["modified_modules"]:
            if isinstance(item, list):
                keys.append([k for role in item for k in role_keys(backbone, [role], OPENDELTA_ROLES)])
            else:
                keys.extend(role_keys(backbone, [item], OPENDELTA_ROLES))
        options["modified_modules"] = keys
        options["common_structure"] = False
    return options


def _opendelta_tensors(delta: DeltaBase, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """An OpenDelta 0.3.2 checkpoint's tensors under this library's keys and shapes.

    Soft prompts: OpenDelta's ``soft_prompt_layer.soft_embeds`` is the one tensor of the delta.
    Prefixes: each attention layer's ``prefix.past_key`` / ``past_value`` (tokens, heads x head size)
    become ``prefix.key`` / ``value`` (heads, tokens, head size). OpenDelta's reparameterisation network
    (saved with ``reparameterize=True``) is not read.

    Raises:
        DeltaCheckpointError: a reparameterised OpenDelta prefix checkpoint.
    """
    own = dict(delta.named_delta_tensors())
    if delta.delta_type == "soft_prompt":
        found = [v for k, v in tensors.items() if k.endswith("soft_embeds")]
        return {next(iter(own)): found[0]} if len(found) == 1 and len(own) == 1 else tensors
    if delta.delta_type == "prefix":
        if any(".reparams." in k or k.startswith("reparams.") for k in tensors):
            raise DeltaCheckpointError(
                f"{path} is an OpenDelta prefix checkpoint saved with reparameterize=True: it holds OpenDelta's "
                "reparameterisation network, which this library does not read. Save it from OpenDelta with "
                "reparameterize=False (plain per-layer prefixes) to load it here."
            )
        converted = {}
        for key, value in tensors.items():
            for theirs, ours in ((".prefix.past_key", ".prefix.key"), (".prefix.past_value", ".prefix.value")):
                if key.endswith(theirs):
                    key = key.removesuffix(theirs) + ours
                    if key in own:
                        heads, tokens, size = own[key].shape
                        value = value.reshape(tokens, heads, size).transpose(0, 1)
            converted[key] = value
        return converted
    return tensors


def load_delta(
    finetuned_delta_path: str | Path,
    backbone_model: nn.Module,
    expected_cls: type[DeltaBase] | None = None,
    delta_config: BaseDeltaConfig | dict[str, Any] | None = None,
    check_hash: bool = True,
    **kwargs: Any,
) -> DeltaBase:
    """Build a saved delta on ``backbone_model`` and load its tensors; see ``DeltaBase.from_finetuned``.

    On any error the backbone is left as it was.
    """
    path = Path(finetuned_delta_path)
    if not path.is_dir():
        raise DeltaCheckpointError(
            f"{path} is not a directory; a delta checkpoint is a directory written by save_finetuned"
        )
    from opendelta_dist.peft_format import is_peft_directory, load_peft

    if is_peft_directory(path) and delta_config is None:
        if expected_cls is not None and expected_cls.__name__ not in ("DeltaBase", "LoraModel"):
            raise DeltaConfigError(f"{path} holds a PEFT LoRA adapter; load it with LoraModel or AutoDeltaModel")
        return load_peft(path, backbone_model, **kwargs)
    file_config = read_config_file(path)
    legacy = "format_version" not in file_config
    if legacy:
        file_config = _from_opendelta(file_config, backbone_model)
    if delta_config is None:
        config_dict = file_config
    elif isinstance(delta_config, BaseDeltaConfig):
        config_dict = delta_config.to_dict()
    else:
        config_dict = dict(delta_config)
    cls = delta_method(config_dict.get("delta_type", ""))
    if expected_cls is not None and expected_cls.__name__ != "DeltaBase" and not issubclass(cls, expected_cls):
        raise DeltaConfigError(
            f"{path} holds a {cls.delta_type!r} delta; load it with {cls.__name__} or AutoDeltaModel, "
            f"not {expected_cls.__name__}"
        )
    config = cls.config_class.from_dict(config_dict, **kwargs)
    if check_hash and not legacy:
        check_backbone(file_config, backbone_model)
    tensors = _read_tensors(path, file_config)
    delta = cls.from_config(config, backbone_model)
    try:
        if legacy:
            tensors = _opendelta_tensors(delta, tensors, path)
        load_delta_tensors(delta, tensors, source=str(path))
    except BaseException:
        delta.detach()
        raise
    return delta


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
        if tuple(value.shape) != tuple(param.shape):
            raise DeltaCheckpointError(
                f"tensor {key!r} in {source} has shape {tuple(value.shape)}, the delta expects {tuple(param.shape)}"
            )
    with torch.no_grad():
        for key, param in own.items():
            param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))
