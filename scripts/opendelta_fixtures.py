"""Reference fixtures written by the real OpenDelta 0.3.2, for ``tests/test_opendelta_fixtures.py``.

Run it in the side environment that ``scripts/opendelta-fixtures.sh`` creates (PyPI ``opendelta==0.3.2``,
``transformers==4.36.2``, torch CPU; pins in ``scripts/opendelta-fixtures.requirements.txt``), never in the
project's own environment::

    bash scripts/opendelta-fixtures.sh                 # all cases, into tests/fixtures/opendelta_0_3_2/
    bash scripts/opendelta-fixtures.sh --only gpt2/    # the cases whose id starts with gpt2/

For every tiny backbone of ``tests/models.py`` (same configs, same seed) and every OpenDelta delta method, in
OpenDelta's default configuration and in one or more custom ones, it

1. builds the backbone (``tests.models.build(family)``) and, once per backbone, writes its full state dict
   (``<backbone>/backbone.safetensors``: transformers 4.36 and 5 may initialise weights differently, so the
   tests load exactly the backbone OpenDelta used), the fixed input and the backbone's own outputs
   (``<backbone>/reference.safetensors``) and its config (``<backbone>/backbone_config.json``);
2. builds the delta with OpenDelta, calls ``freeze_module(set_state_dict=True)`` as OpenDelta's docs do,
   adds seeded Gaussian noise to every trainable parameter (so the delta changes the outputs), runs the
   modified model on the fixed input and calls OpenDelta's ``save_finetuned(case_dir)``: the directory holds
   OpenDelta's untouched output (``config.json`` + ``pytorch_model.bin``);
3. writes the modified model's outputs (``outputs.safetensors``: ``logits``, and ``last_hidden_state`` for
   the classification models, whose logits only see the first token), then reloads the checkpoint with
   OpenDelta's own ``AutoDeltaModel.from_finetuned`` onto a fresh backbone and records whether OpenDelta
   reproduces its own outputs (``case.json["opendelta_reload"]``; where it does not, its outputs are kept as
   ``reloaded_logits``);
4. writes ``case.json`` (backbone, method, options, what OpenDelta saved, or the exception OpenDelta raised
   and at which step: OpenDelta crashes on some configurations, and that is recorded instead of a
   checkpoint), and ``index.json``, the summary of all cases.

The output is deterministic: running it twice gives the same files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import shutil
import sys
import traceback
import warnings
import zlib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import transformers
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import models as tm  # the tests' tiny backbones: the same configs and seed

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "opendelta_0_3_2"
FORMAT = 1

#: the versions the fixtures are made with (the script refuses others: the fixtures say what *this* OpenDelta wrote)
REQUIRED = {"opendelta": "0.3.2", "transformers": "4.36.2"}

BACKBONE_SEED = 0  # tests.models.build(family, seed=0)
DELTA_SEED = 1234  # torch.manual_seed before building a delta (OpenDelta initialises with the global RNG)
NOISE_STD = 0.1  # std of the noise added to every trainable parameter after freeze_module

#: directory name of each backbone -> tests.models family
BACKBONES = {"t5": "t5", "bert": "bert", "gpt2": "gpt2", "bart": "bart", "roberta": "roberta"}

METHODS = {
    "lora": "LoraModel",
    "adapter": "AdapterModel",
    "bitfit": "BitFitModel",
    "low_rank_adapter": "LowRankAdapterModel",
    "compacter": "CompacterModel",
    "parallel_adapter": "ParallelAdapterModel",
    "prefix": "PrefixModel",
    "soft_prompt": "SoftPromptModel",
}

_PA_BERT_LIKE = ["attention", "attention", "intermediate.dense", r"[r]layer\.\d+\.output\.dense"]

#: method -> case name -> {"why": ..., "options": {...} or {backbone: {...}}}. "default" passes no option at all
#: (OpenDelta's default modules through its common-structure mapping); the custom cases name explicit modules.
CASES: dict[str, dict[str, dict[str, Any]]] = {
    "lora": {
        "default": {"why": "OpenDelta's defaults: r=8, alpha=16, modules attn@.q@ / attn@.v@ (common structure)"},
        "r4_explicit": {
            "why": "rank 4, alpha 8 on explicit modules (BERT: classifier unfrozen, so the head is saved too)",
            "per_backbone": {
                "t5": {"lora_r": 4, "lora_alpha": 8, "modified_modules": ["SelfAttention.q", "SelfAttention.v"]},
                "bert": {
                    "lora_r": 4,
                    "lora_alpha": 8,
                    "modified_modules": ["attention.self.query", "attention.self.value"],
                    "unfrozen_modules": ["deltas", "classifier"],
                },
                "gpt2": {"lora_r": 4, "lora_alpha": 8, "modified_modules": ["attn.c_attn"]},
                "bart": {"lora_r": 4, "lora_alpha": 8, "modified_modules": ["q_proj", "v_proj"]},
                "roberta": {"lora_r": 4, "lora_alpha": 32, "lora_dropout": 0.1, "modified_modules": ["query", "value"]},
            },
        },
    },
    "adapter": {
        "default": {"why": "OpenDelta's defaults: bottleneck 24, gelu_new, after attn@.proj@ / ff@.w2@"},
        "b8_relu": {
            "why": "bottleneck 8, relu, after whole sub-layers (BERT: after the 37-wide intermediate layer)",
            "per_backbone": {
                b: {"bottleneck_dim": 8, "non_linearity": "relu", "modified_modules": mods}
                for b, mods in {
                    "t5": ["SelfAttention", "DenseReluDense"],
                    "bert": ["attention", "intermediate"],
                    "gpt2": ["attn", "mlp"],
                    "bart": ["self_attn", "fc2"],
                    "roberta": ["attention.output", "output.LayerNorm"],
                }.items()
            },
        },
    },
    "bitfit": {
        "default": {"why": "OpenDelta's defaults: the biases in attn@, ff@, layer_norm@ and lm_head@.proj@"},
        "custom_modules": {
            "why": "biases of explicit modules (GPT-2: attn.c_attn + ln_1; T5: its bias-less T5LayerNorms)",
            "per_backbone": {
                "t5": {"modified_modules": ["layer_norm", "final_layer_norm"]},
                "bert": {"modified_modules": ["attention.self.query", "LayerNorm"]},
                "gpt2": {"modified_modules": ["attn.c_attn", "ln_1"]},
                "bart": {"modified_modules": ["self_attn_layer_norm", "fc1"]},
                "roberta": {"modified_modules": ["attention", "intermediate"]},
            },
        },
    },
    "low_rank_adapter": {
        "default": {"why": "OpenDelta's defaults: reduction 32, rank 1, gelu_new, after attn@.proj@ / ff@.w2@"},
        "rank2": {
            "why": "low_rank_rank=2 (else OpenDelta's defaults)",
            "options": {"low_rank_rank": 2},
        },
        "rf8_explicit": {
            "why": "reduction_factor=8, relu, glorot-normal, explicit modules (rank left at 1)",
            "per_backbone": {
                b: {
                    "reduction_factor": 8,
                    "non_linearity": "relu",
                    "low_rank_w_init": "glorot-normal",
                    "modified_modules": mods,
                }
                for b, mods in {
                    "t5": ["SelfAttention.o", "DenseReluDense.wo"],
                    "bert": ["attention.output.dense", "intermediate"],
                    "gpt2": ["attn.c_proj", "mlp.c_proj"],
                    "bart": ["self_attn.out_proj", "fc2"],
                    "roberta": ["attention.output.dense", "intermediate"],
                }.items()
            },
        },
    },
    "compacter": {
        "default": {"why": "OpenDelta's defaults: reduction 16, hypercomplex_division 4, factorized phm, gelu_new"},
        "rf8": {
            "why": "OpenDelta's defaults except reduction_factor=8 (the default 16 gives a 2-wide bottleneck here, "
            "not divisible by hypercomplex_division=4)",
            "options": {"reduction_factor": 8},
        },
        "custom": {
            "why": "reduction 4, division 2, phm_rank 2, factorized phm rule, uniform c init, glorot-normal, no "
            "up-sampler bias, relu, explicit modules",
            "per_backbone": {
                b: {
                    "reduction_factor": 4,
                    "hypercomplex_division": 2,
                    "phm_rank": 2,
                    "factorized_phm_rule": True,
                    "phm_c_init": "uniform",
                    "hypercomplex_nonlinearity": "glorot-normal",
                    "use_bias_up_sampler": False,
                    "non_linearity": "relu",
                    "modified_modules": mods,
                }
                for b, mods in {
                    "t5": ["SelfAttention", "DenseReluDense"],
                    "bert": ["attention", "layer.1.output"],
                    "gpt2": ["attn", "mlp"],
                    "bart": ["self_attn", "encoder_attn", "fc2"],
                    "roberta": ["attention", "layer.1.output"],
                }.items()
            },
        },
    },
    "parallel_adapter": {
        "default": {"why": "OpenDelta's defaults: bottleneck 24, pairs attn@/attn@ and ff@.w1@/ff@.w2@"},
        "b8_pairs": {
            "why": "bottleneck 8, explicit (before, after) module pairs",
            "per_backbone": {
                "t5": {
                    "bottleneck_dim": 8,
                    "modified_modules": ["SelfAttention", "SelfAttention", "DenseReluDense.wi", "DenseReluDense.wo"],
                },
                "bert": {"bottleneck_dim": 8, "modified_modules": _PA_BERT_LIKE},
                "gpt2": {"bottleneck_dim": 8, "modified_modules": ["attn", "attn", "mlp.c_fc", "mlp.c_proj"]},
                "bart": {"bottleneck_dim": 8, "modified_modules": ["self_attn", "self_attn", "fc1", "fc2"]},
                "roberta": {"bottleneck_dim": 8, "modified_modules": _PA_BERT_LIKE},
            },
        },
        "b8_ffn_pair": {
            "why": "bottleneck 8, one (before fc1, after fc2) pair: BART's attention takes hidden_states by keyword, "
            "which OpenDelta's parallel adapter cannot read",
            "only": ["bart"],
            "options": {"bottleneck_dim": 8, "modified_modules": ["fc1", "fc2"]},
        },
    },
    "prefix": {
        "default": {
            "why": "OpenDelta's defaults: 6 prefix tokens, reparameterize=True, embed_dim=mid_dim=512 (BERT only: the "
            "512x512 reparameterization network makes a 1.3 MB checkpoint; small_reparam has the default modules)",
            "only": ["bert"],
        },
        "small_reparam": {
            "why": "3 prefix tokens, reparameterize left at its default (True), embed_dim=16, mid_dim=24",
            "options": {"prefix_token_num": 3, "embed_dim": 16, "mid_dim": 24},
        },
        "no_reparam": {
            "why": "4 prefix tokens stored directly (reparameterize=False)",
            "options": {"prefix_token_num": 4, "reparameterize": False},
        },
        "self_attn_reparam": {
            "why": "explicit modules (OpenDelta has no BART map): every self_attn, encoder and decoder; 3 prefix "
            "tokens through a reparameterization network with embed_dim=16, mid_dim=32",
            "only": ["bart"],
            "options": {"prefix_token_num": 3, "embed_dim": 16, "mid_dim": 32, "modified_modules": ["self_attn"]},
        },
        "self_attn_no_reparam": {
            "why": "explicit modules (OpenDelta has no BART map): every self_attn, encoder and decoder; 3 prefix "
            "tokens stored directly (reparameterize=False)",
            "only": ["bart"],
            "options": {"prefix_token_num": 3, "reparameterize": False, "modified_modules": ["self_attn"]},
        },
    },
    "soft_prompt": {
        "default": {"why": "OpenDelta's defaults: 100 soft tokens initialised from the first 100 token embeddings"},
        "n5": {"why": "5 soft tokens, token_init left at its default (True)", "options": {"soft_token_num": 5}},
        "n5_random": {
            "why": "5 soft tokens, random init (token_init=False, init_range=0.1)",
            "options": {"soft_token_num": 5, "token_init": False, "init_range": 0.1},
        },
        "n100_random": {
            "why": "the default 100 soft tokens, random init (token_init=False): 107-token sequences",
            "options": {"token_init": False},
        },
    },
}


def case_options(method: str, case: str, backbone: str) -> dict[str, Any]:
    """The keyword arguments the case passes to OpenDelta's delta class."""
    spec = CASES[method][case]
    if "per_backbone" in spec:
        return dict(spec["per_backbone"][backbone])
    return dict(spec.get("options", {}))


def check_versions() -> dict[str, str]:
    """The versions in use; exits unless they are :data:`REQUIRED`'s."""
    found = {}
    for name in ["opendelta", "transformers", "torch", "safetensors", "numpy"]:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    wrong = {k: (found[k], v) for k, v in REQUIRED.items() if found[k] != v}
    if wrong:
        sys.exit(
            "this script records what OpenDelta 0.3.2 writes with transformers 4.36.2; found "
            + ", ".join(f"{k}=={have} (need {need})" for k, (have, need) in wrong.items())
            + ". Run it through scripts/opendelta-fixtures.sh, which creates that environment."
        )
    return found


def write_tensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Safetensors of copies (tied weights are saved as separate tensors)."""
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, file)


@dataclass
class Backbone:
    """One tiny backbone: how to build it, its fixed input and its own state."""

    name: str
    family: str
    classification: bool
    inputs: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]

    @classmethod
    def make(cls, name: str) -> Backbone:
        family = BACKBONES[name]
        spec = tm.FAMILIES[family]
        model = tm.build(family, seed=BACKBONE_SEED)
        batch = tm.batch(family)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if spec.seq2seq:  # explicit decoder inputs: the labels shifted right after the decoder start token
            labels = batch["labels"]
            start = torch.full((labels.shape[0], 1), model.config.decoder_start_token_id, dtype=labels.dtype)
            inputs["decoder_input_ids"] = torch.cat([start, labels[:, :-1]], dim=1)
        return cls(name, family, spec.classification, inputs, dict(model.state_dict()))

    def build(self) -> nn.Module:
        """A fresh copy (``tests.models.build``: the same weights every time)."""
        return tm.build(self.family, seed=BACKBONE_SEED).eval()

    @torch.no_grad()
    def run(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``logits`` on the fixed input, and for the classification models the last hidden state."""
        model.eval()
        # clones: OpenDelta's soft prompt rewrites the caller's attention_mask in place (``real_tokens.data = ...``)
        kwargs = {k: v.clone() for k, v in self.inputs.items()}
        if self.classification:
            res = model(**kwargs, output_hidden_states=True)
            return {"logits": res.logits, "last_hidden_state": res.hidden_states[-1]}
        return {"logits": model(**kwargs).logits}

    def write(self, directory: Path) -> None:
        """backbone.safetensors, backbone_config.json and reference.safetensors (input and outputs)."""
        model = self.build()
        write_tensors(self.state, directory / "backbone.safetensors")
        described = {"class": type(model).__name__, "family": self.family, "config": model.config.to_dict()}
        (directory / "backbone_config.json").write_text(json.dumps(described, indent=2, sort_keys=True) + "\n")
        reference = {**{f"input.{k}": v for k, v in self.inputs.items()}, **self.run(model)}
        write_tensors(reference, directory / "reference.safetensors")


def make_case(opendelta: ModuleType, backbone: Backbone, method: str, case: str, case_dir: Path) -> dict[str, Any]:
    """Build, perturb, run, save and reload one case; returns the record for case.json."""
    case_id = f"{backbone.name}/{method}/{case}"
    options = case_options(method, case, backbone.name)
    record: dict[str, Any] = {
        "id": case_id,
        "backbone": backbone.name,
        "family": backbone.family,
        "method": method,
        "opendelta_class": METHODS[method],
        "case": case,
        "why": CASES[method][case]["why"],
        "options": options,
        "freeze_module": {"exclude": None, "set_state_dict": True},
        "noise_std": NOISE_STD,
    }
    stage = "build"
    quiet = io.StringIO()  # OpenDelta prints (rich trees): keep the run's output to one line a case
    try:
        with contextlib.redirect_stdout(quiet):
            model = backbone.build()
            torch.manual_seed(DELTA_SEED)
            delta = getattr(opendelta, METHODS[method])(backbone_model=model, **options)
            stage = "freeze_module"
            delta.freeze_module(set_state_dict=True)
            stage = "perturb"
            gen = torch.Generator().manual_seed(zlib.crc32(case_id.encode()))
            perturbed = []
            with torch.no_grad():
                for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * NOISE_STD)
                        perturbed.append(name)
            stage = "forward"
            outputs = backbone.run(model)
            stage = "save_finetuned"
            delta.save_finetuned(str(case_dir))
    except Exception as e:  # OpenDelta's failures are the data here
        record["opendelta"] = {
            "ok": False,
            "stage": stage,
            "error_type": type(e).__name__,
            "error_message": str(e)[:2000],
            "traceback_tail": traceback.format_exc().strip().splitlines()[-6:],
        }
        for leftover in case_dir.iterdir():  # a half-written checkpoint is not a fixture
            leftover.unlink()
        return record

    record["opendelta"] = {"ok": True}
    record["perturbed_parameters"] = perturbed
    saved = torch.load(case_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    record["saved"] = {
        "files": sorted(f.name for f in case_dir.iterdir()),
        "tensors": {k: list(v.shape) for k, v in saved.items()},
        # saved tensors that are backbone tensors too (BitFit's unfrozen biases, an unfrozen head)
        "backbone_tensors": sorted(k for k in saved if k in backbone.state),
        # parameters noise was added to that the checkpoint lacks (OpenDelta filters the state dict by the
        # names that were trainable at freeze_module time)
        "perturbed_but_not_saved": sorted(set(perturbed) - set(saved)),
    }
    record["config_json"] = json.loads((case_dir / "config.json").read_text())
    record["output_shapes"] = {k: list(v.shape) for k, v in outputs.items()}
    base = backbone.run(backbone.build())["logits"]
    same_shape = outputs["logits"].shape == base.shape
    record["backbone_max_abs_change"] = float((outputs["logits"] - base).abs().max()) if same_shape else None

    # OpenDelta's own round trip: from_finetuned onto a fresh backbone, same input
    reload: dict[str, Any] = {}
    try:
        with contextlib.redirect_stdout(quiet):
            fresh = backbone.build()
            torch.manual_seed(DELTA_SEED + 1)  # another init: whatever the checkpoint lacks shows
            opendelta.AutoDeltaModel.from_finetuned(str(case_dir), backbone_model=fresh)
            again = backbone.run(fresh)
        diffs = {k: float((again[k] - outputs[k]).abs().max()) for k in outputs if again[k].shape == outputs[k].shape}
        reload["ok"] = True
        reload["max_abs_diff"] = diffs
        reload["reproduces"] = len(diffs) == len(outputs) and all(d <= 1e-5 for d in diffs.values())
        if not reload["reproduces"]:  # kept only where OpenDelta does not reproduce itself (fixtures stay small)
            outputs.update({f"reloaded_{k}": v for k, v in again.items()})
        state = set(fresh.state_dict())
        reload["checkpoint_keys_not_in_model"] = sorted(k for k in saved if k not in state)
    except Exception as e:  # a checkpoint OpenDelta cannot load back is recorded too
        reload = {"ok": False, "reproduces": False, "error_type": type(e).__name__, "error_message": str(e)[:2000]}
    record["opendelta_reload"] = reload
    write_tensors(outputs, case_dir / "outputs.safetensors")
    return record


def main(argv: list[str] | None = None) -> None:
    """Write the fixtures (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture directory (replaced whole)")
    parser.add_argument("--only", default="", help="only the case ids starting with this (keeps the others)")
    args = parser.parse_args(argv)
    versions = check_versions()

    warnings.filterwarnings("ignore")
    import opendelta  # only here: the version check above explains a wrong environment first
    from opendelta.utils import logging as od_logging

    transformers.logging.set_verbosity_error()
    od_logging.set_verbosity(logging.ERROR)
    for name in list(logging.root.manager.loggerDict):  # OpenDelta sets each module's logger to INFO
        if name.startswith("opendelta"):
            logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)  # deterministic, and polite on a shared machine

    out: Path = args.out.resolve()
    if not args.only and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {
        "format": FORMAT,
        "generator": "scripts/opendelta_fixtures.py (bash scripts/opendelta-fixtures.sh)",
        "versions": versions,
        "python": platform.python_version(),
        "backbone_seed": BACKBONE_SEED,
        "delta_seed": DELTA_SEED,
        "noise_std": NOISE_STD,
        "cases": {},
    }
    if args.only and (out / "index.json").exists():
        index["cases"] = json.loads((out / "index.json").read_text())["cases"]

    for name in BACKBONES:
        backbone = Backbone.make(name)
        (out / name).mkdir(exist_ok=True)
        backbone.write(out / name)
        for method in METHODS:
            for case, spec in CASES[method].items():
                case_id = f"{name}/{method}/{case}"
                if name not in spec.get("only", BACKBONES) or not case_id.startswith(args.only):
                    continue
                case_dir = out / name / f"{method}__{case}"
                if case_dir.exists():
                    shutil.rmtree(case_dir)
                case_dir.mkdir()
                record = make_case(opendelta, backbone, method, case, case_dir)
                (case_dir / "case.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
                summary: dict[str, Any] = {
                    "dir": f"{name}/{case_dir.name}",
                    "backbone": name,
                    "method": method,
                    "case": case,
                    "opendelta_ok": record["opendelta"]["ok"],
                }
                if record["opendelta"]["ok"]:
                    summary["saved_tensors"] = len(record["saved"]["tensors"])
                    summary["opendelta_reload_reproduces"] = record["opendelta_reload"]["reproduces"]
                    status = "ok"
                else:
                    status = f"{record['opendelta']['error_type']} at {record['opendelta']['stage']}"
                    summary["opendelta_error"] = status
                index["cases"][case_id] = summary
                print(f"{case_id:45s} {status}", flush=True)

    index["cases"] = dict(sorted(index["cases"].items()))
    (out / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{len(index['cases'])} cases, {total / 1024:.0f} KiB in {out}")


if __name__ == "__main__":
    main()
