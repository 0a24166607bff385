"""Delta-tune a tiny T5 with LoRA on the tiny data set in the repo, on CPU, with 1 or 2 processes.

    torchrun --standalone --nproc_per_node=2 examples/tune_tiny.py      # 2 processes, DDP over gloo
    python examples/tune_tiny.py                                       # 1 process

The backbone is a small T5 built from a config with random weights (nothing is downloaded) and the
byte-level ByT5 tokenizer (no vocabulary file). Only the LoRA delta is trained (DDP averages its
gradients), saved, and finally loaded onto a fresh backbone to check that it reproduces the loss.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

from opendelta_dist import AutoDeltaModel, LoraModel, check_optimizer

HERE = Path(__file__).parent


def build_backbone() -> T5ForConditionalGeneration:
    """The same tiny T5 on every call (fixed seed)."""
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=384,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


def load_batches(tokenizer: ByT5Tokenizer, rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's share of the tiny data set, as one tokenized batch."""
    with (HERE / "data" / "tiny_sentiment.tsv").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    rows = rows[rank::world]
    enc = tokenizer([r["sentence"] for r in rows], padding=True, return_tensors="pt")
    labels = tokenizer([r["label"] for r in rows], padding=True, return_tensors="pt").input_ids
    labels[labels == tokenizer.pad_token_id] = -100
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


def main() -> None:
    """Train, save, reload, compare."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", type=Path, default=Path("outputs/tiny_lora"))
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    main_process = rank == 0  # all printing and saving happens here

    model = build_backbone()
    torch.manual_seed(1)
    delta = LoraModel(backbone_model=model, lora_r=8, modified_modules=["q", "v", "o"])
    delta.freeze_module(exclude=["deltas"], set_state_dict=True)
    if main_process:
        delta.log()
    batch = load_batches(ByT5Tokenizer(), rank, world)

    wrapped = DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW(delta.trainable_parameters(), lr=args.lr)
    check_optimizer(optimizer, model)  # the optimizer holds exactly the delta's parameters

    model.train()
    for step in range(1, args.steps + 1):
        loss = wrapped(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if main_process and (step == 1 or step % 10 == 0):
            print(f"step {step:3d}  loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        final = model(**batch).loss.item()
    if main_process:
        delta.save_finetuned(args.out)
        fresh = build_backbone().eval()
        AutoDeltaModel.from_finetuned(args.out, backbone_model=fresh)
        with torch.no_grad():
            reloaded = fresh(**batch).loss.item()
        print(f"saved the delta to {args.out}; reloaded on a fresh backbone: loss {reloaded:.4f} (trained {final:.4f})")
        if abs(reloaded - final) > 1e-6:
            raise SystemExit("the reloaded delta does not reproduce the trained model")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
