"""Hidden sizes by a dummy forward: what a delta method needs to know of modules that are not linear layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from opendelta_dist.addressing import named_backbone_modules
from opendelta_dist.errors import HiddenSizeInferenceError
from opendelta_dist.operations import _first_tensor, _map_primary


def dummy_forward_dims(backbone: nn.Module, targets: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """Input and output sizes of ``targets`` (name -> module), read by hooks during one dummy forward.

    The forward uses the ``delta_dummy_inputs`` or ``dummy_inputs`` of the outermost modules that have them
    (transformers models do), runs without gradients in eval mode and leaves the random number generators as
    they were.

    Raises:
        HiddenSizeInferenceError: there is no ``dummy_inputs``, the forward failed, or it did not reach a
            target.
    """
    runners = _dummy_runners(backbone)
    fix = (
        "Either aim the delta at modules whose sizes are known without running the model (linear layers), "
        "or give the backbone an attribute `delta_dummy_inputs` (a dict of keyword arguments for a small valid "
        "forward), e.g. model.delta_dummy_inputs = {'input_ids': torch.tensor([[1, 2, 3]])}."
    )
    if not runners:
        raise HiddenSizeInferenceError(
            f"the hidden sizes of {sorted(targets)[:3]} are needed and can only be found by a dummy forward, "
            f"but {type(backbone).__name__} has no `dummy_inputs`. {fix}"
        )
    dims: dict[str, tuple[int, int]] = {}
    handles = []
    for name, module in targets.items():

        def record(mod: nn.Module, args: tuple, kwargs: dict, output: Any, name: str = name) -> None:
            _, x = _first_tensor(args, kwargs)
            out: list[int] = []
            _map_primary(output, lambda t: out.append(t.shape[-1]) or t)
            dims[name] = (x.shape[-1], out[0])

        handles.append(module.register_forward_hook(record, with_kwargs=True))
    training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for runner, inputs in runners:
                runner(**inputs)
    except Exception as exc:
        raise HiddenSizeInferenceError(
            f"the dummy forward that finds the hidden sizes of the modified modules failed: "
            f"{type(exc).__name__}: {exc}. {fix}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
        backbone.train(training)
    missing = [n for n in targets if n not in dims]
    if missing:
        raise HiddenSizeInferenceError(f"the dummy forward did not call the modules {missing[:5]}. {fix}")
    return dims


def _dummy_runners(backbone: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """The modules to call for a dummy forward, with their inputs on the right device."""
    candidates: list[tuple[str, nn.Module]] = []
    for name, module in named_backbone_modules(backbone):
        if any(name.startswith(p + ".") or p == "" for p, _ in candidates):
            continue
        if _inputs_of(module) is not None:
            candidates.append((name, module))
    runners = []
    for _, module in candidates:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        given = _inputs_of(module) or {}
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in given.items()}
        runners.append((module, inputs))
    return runners


def _inputs_of(module: nn.Module) -> dict[str, Any] | None:
    """The module's dummy inputs: ``delta_dummy_inputs`` (set by the user), else transformers' ``dummy_inputs``
    when they feed its main input (an image model's are token ids it does not take: it gets a blank image)."""
    own = module.__dict__.get("delta_dummy_inputs")
    if isinstance(own, dict):
        return own
    inputs = getattr(module, "dummy_inputs", None)
    if not isinstance(inputs, dict):
        return None
    main = getattr(module, "main_input_name", None)
    config = getattr(module, "config", None)
    if main == "pixel_values" and main not in inputs and isinstance(getattr(config, "image_size", None), int):
        channels = getattr(config, "num_channels", 3)
        return {main: torch.zeros(1, channels, config.image_size, config.image_size)}
    return inputs
