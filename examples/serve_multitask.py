"""Serve three tasks from one backbone: each request runs with its task's delta, switched by attach/detach.

    python examples/serve_multitask.py

One tiny T5 (tune_tiny.py's: random weights, byte-level tokenizer, nothing is downloaded) stays in memory. Three
deltas of different methods are tuned on three toy tasks over the same sentences (sentiment, first
word, number of words), saved, and loaded back detached. :class:`DeltaServer` then answers a mixed
stream of requests: before a request it attaches that task's delta (detaching the previous one),
so the backbone computes exactly "backbone + this delta" and nothing of the others. Consecutive
requests of one task keep the delta attached. A lock makes the switch safe across threads.

A request may also name ``skip_layers`` (AdapterDrop at inference): the deltas of those layers, in every stack,
are bypassed for that request only. This shows the mechanism, not its quality. The deltas here were not trained
with robust AdapterDrop, so their answers may change when layers are skipped. Nor is the request much faster:
the backbone still runs every layer, and only the skipped deltas' own small computation is saved. AdapterDrop's
speed-up at inference comes from ``parallel_forward``, where several tasks share one pass over the lower layers
(docs/adapterdrop.md).
"""

from __future__ import annotations

import argparse
import csv
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import ByT5Tokenizer
from tune_tiny import build_backbone  # the tiny T5 of the other example (this directory is on the path)

from opendelta_dist import AdapterModel, AutoDeltaModel, DeltaBase, LoraModel, LowRankAdapterModel

HERE = Path(__file__).parent
TASKS: dict[str, tuple[Callable[[nn.Module], DeltaBase], Callable[[dict[str, str]], str]]] = {
    "sentiment": (lambda m: LoraModel(m, modified_modules=["q", "v", "o"]), lambda row: row["label"]),
    "first_word": (lambda m: AdapterModel(m, bottleneck_dim=16), lambda row: row["sentence"].split()[0]),
    "length": (lambda m: LowRankAdapterModel(m, reduction_factor=4), lambda row: str(len(row["sentence"].split()))),
}


class DeltaServer:
    """One backbone, several detached deltas; each request runs with exactly its task's delta.

    Args:
        backbone: the shared model.
        tokenizer: turns request texts into ids and generated ids back into text.
    """

    def __init__(self, backbone: nn.Module, tokenizer: ByT5Tokenizer) -> None:
        self.backbone = backbone.eval()
        self.tokenizer = tokenizer
        self.deltas: dict[str, DeltaBase] = {}
        self.active: str | None = None
        self.switches = 0
        self._lock = threading.Lock()

    def add(self, task: str, checkpoint: Path) -> None:
        """Load the delta saved at ``checkpoint`` for ``task``, kept detached until a request needs it."""
        with self._lock:
            self._use(None)
            delta = AutoDeltaModel.from_finetuned(checkpoint, self.backbone)
            delta.detach()
            self.deltas[task] = delta

    def _use(self, task: str | None) -> None:
        if task == self.active:
            return
        if self.active is not None:
            self.deltas[self.active].detach()
        if task is not None:
            self.deltas[task].attach()
            self.switches += 1
        self.active = task

    @torch.no_grad()
    def generate(
        self, task: str, texts: list[str], max_new_tokens: int = 12, skip_layers: list[int] | None = None
    ) -> list[str]:
        """Greedy answers to ``texts`` by the backbone with ``task``'s delta.

        Args:
            task: the task whose delta answers.
            texts: the requests.
            max_new_tokens: the longest answer.
            skip_layers: layer indices (in every stack) whose deltas this request bypasses; the backbone still
                runs those layers, so this saves only the deltas' own computation.

        Raises:
            KeyError: no delta was added for ``task``.
            DeltaConfigError: ``skip_layers`` names no layer of the backbone.
        """
        if task not in self.deltas:
            raise KeyError(f"no delta for task {task!r}; tasks: {sorted(self.deltas)}")
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        with self._lock:
            self._use(task)
            with self.deltas[task].skipping(skip_layers):
                out = self.backbone.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)


def read_rows() -> list[dict[str, str]]:
    """The example's sentences."""
    with (HERE / "data" / "tiny_sentiment.tsv").open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


def tune(task: str, out: Path, steps: int, tokenizer: ByT5Tokenizer) -> None:
    """Tune ``task``'s delta on a fresh backbone and save it to ``out``."""
    make_delta, target = TASKS[task]
    model = build_backbone()
    torch.manual_seed(1)
    delta = make_delta(model)
    delta.freeze_module(exclude=["deltas"], set_state_dict=True)
    rows = read_rows()
    enc = tokenizer([r["sentence"] for r in rows], padding=True, return_tensors="pt")
    labels = tokenizer([target(r) for r in rows], padding=True, return_tensors="pt").input_ids
    labels[labels == tokenizer.pad_token_id] = -100
    optimizer = torch.optim.AdamW(delta.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"tuned {task} ({delta.delta_type}): final loss {loss.item():.3f}")
    delta.save_finetuned(out)


def main() -> None:
    """Tune the three deltas, then serve a mixed stream of requests from one backbone."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("outputs/multitask"))
    args = parser.parse_args()
    tokenizer = ByT5Tokenizer()
    for task in TASKS:
        tune(task, args.out / task, args.steps, tokenizer)

    server = DeltaServer(build_backbone(), tokenizer)
    for task in TASKS:
        server.add(task, args.out / task)
    sentences = [r["sentence"] for r in read_rows()[:3]]
    for task in ["sentiment", "length", "first_word", "sentiment", "sentiment", "length"]:
        for sentence, answer in zip(sentences, server.generate(task, sentences), strict=True):
            print(f"{task:>10} | {sentence} -> {answer}")
    # AdapterDrop per request: the sentiment delta without its layer-0 parts, for this request only. It was not
    # trained with robust AdapterDrop, so its answers may differ from those above
    for sentence, answer in zip(sentences, server.generate("sentiment", sentences, skip_layers=[0]), strict=True):
        print(f"{'sentiment':>10} | {sentence} -> {answer}   (skip_layers=[0])")
    print(f"{server.switches} delta switches")


if __name__ == "__main__":
    main()
