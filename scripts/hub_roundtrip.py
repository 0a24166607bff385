"""A delta's round trip through the real Hugging Face Hub: push, pull into a fresh cache, compare, delete.

    HF_TOKEN=hf_... python scripts/hub_roundtrip.py [--namespace you] [--keep]

The tests never reach the Hub (tests/test_hub.py runs huggingface_hub's cache and error handling offline);
this script is the check for a machine that can: it pushes a tiny T5's LoRA to a new private repository
``<namespace>/opendelta-dist-roundtrip-<random>``, pulls it by id into an empty cache with this project and with
PEFT, checks that both compute the pushed delta's logits and that the model card parses with its metadata,
pulls the first commit again by revision after a second push, and deletes the repository (``--keep`` keeps
it). It prints one line per check and exits non-zero on the first that fails.
"""

from __future__ import annotations

import argparse
import copy
import secrets
import sys
import tempfile
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_T5 = {"vocab_size": 99, "d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4}


def _backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY_T5, dropout_rate=0.0))
    model.config = copy.deepcopy(model.config)
    model.config._name_or_path = "google-t5/t5-small"  # the card's base model (the weights are the tiny T5's)
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 10).view(1, -1)
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits


def main(argv: list[str] | None = None) -> int:
    """Run the round trip; 0 when every check passed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--namespace", help="the user or organisation to create the repository in (default: yours)")
    parser.add_argument("--keep", action="store_true", help="keep the repository afterwards")
    args = parser.parse_args(argv)

    import peft
    from huggingface_hub import HfApi, ModelCard, constants
    from huggingface_hub.errors import LocalTokenNotFoundError

    from opendelta_dist import AutoDeltaModel, LoraModel

    if constants.HF_HUB_OFFLINE:
        print("hub_roundtrip: HF_HUB_OFFLINE is set; unset it to reach the Hub", file=sys.stderr)
        return 2
    api = HfApi()
    try:
        namespace = args.namespace or api.whoami()["name"]
    except LocalTokenNotFoundError:
        print("hub_roundtrip: no Hugging Face token: set HF_TOKEN or run `hf auth login`", file=sys.stderr)
        return 2
    repo_id = f"{namespace}/opendelta-dist-roundtrip-{secrets.token_hex(4)}"
    model = _backbone()
    delta = LoraModel(model, lora_r=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, p in delta.named_delta_tensors():
            p.normal_(std=0.3)
    expected = _logits(model)

    def check(name: str, ok: bool) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
        if not ok:
            raise SystemExit(1)

    try:
        first = delta.push_to_hub(repo_id, private=True, commit_message="round trip 1")
        check(f"pushed {repo_id}: {first}", True)
        with tempfile.TemporaryDirectory() as cache:
            pulled = AutoDeltaModel.from_finetuned(repo_id, backbone_model=_backbone(), cache_dir=cache)
            check("pulled with opendelta_dist: same logits", torch.allclose(_logits(pulled.backbone_model), expected))
            in_peft = peft.PeftModel.from_pretrained(_backbone(), repo_id, cache_dir=cache)
            check("pulled with PEFT: same logits", torch.allclose(_logits(in_peft), expected, atol=1e-5))
            card = ModelCard.load(repo_id)
            check("model card metadata", card.data.library_name == "opendelta-dist" and "lora" in card.data.tags)
            commit_one = api.list_repo_commits(repo_id)[0].commit_id
            with torch.no_grad():
                for _, p in delta.named_delta_tensors():
                    p.add_(1.0)
            delta.push_to_hub(repo_id, commit_message="round trip 2")
            again = AutoDeltaModel.from_finetuned(
                repo_id, backbone_model=_backbone(), cache_dir=cache, revision=commit_one
            )
            check("the first commit by revision", torch.allclose(_logits(again.backbone_model), expected))
    finally:
        if not args.keep:
            api.delete_repo(repo_id, missing_ok=True)
            print(f"deleted {repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
