"""One few-shot run of the reference side of ``benchmarks/prompt_sst2.py``: the real OpenPrompt 1.0.1 with LoRA
from the real OpenDelta 0.3.2, the way OpenPrompt's and OpenDelta's tutorials combine them.

It runs in OpenPrompt's side environment (``scripts/openprompt-fixtures.sh`` makes it, with OpenDelta added to
its pins), never in the project's: this file imports neither ``opendelta_dist`` nor anything of the project but
``benchmarks/common.py`` (memory readings). The driver writes a JSON spec and starts::

    /tmp/openprompt-1.0.1-venv/bin/python benchmarks/openprompt_runner.py SPEC.json

What it does, in the order of OpenDelta's ``examples/tutorial/1_with_openprompt.py``:
``load_plm("bert", path)`` -> ``ManualTemplate`` -> ``ManualVerbalizer`` -> ``LoraModel(backbone_model=plm, ...)``
-> ``freeze_module(exclude=["deltas"], set_state_dict=True)`` -> ``PromptForClassification(plm, template,
verbalizer)`` -> ``PromptDataLoader`` for the training and dev rows -> AdamW over the trainable parameters,
cross entropy of the class logits. Before training, the trainable tensors and the freshly initialised MLM head
get the values the spec's ``init_state`` file holds (the values our run started from), so both sides start
from the same point; the training batches come in the spec's order (``train_batches``: row indices per step).

Times: ``train_s`` is the training loop (every step: batch, forward, loss, backward, optimizer step),
``eval_s`` the evaluation loop over the dev rows (``torch.no_grad``); set-up (imports, loading, wrapping and
tokenizing the rows, attaching LoRA) is ``setup_s``. Memory: the process's peak resident set before training
(set-up included) and during training and evaluation (the kernel's high-water mark reset to the resident set
after set-up), in kB, from ``/proc/self/status``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()

import common  # noqa: E402  (benchmarks/common.py, beside this file)


def _examples(rows: list[dict[str, Any]]) -> list[Any]:
    from openprompt.data_utils import InputExample

    return [InputExample(guid=i, text_a=row["text"], label=int(row["label"])) for i, row in enumerate(rows)]


def _ids_hash(digest: Any, batch: Any) -> None:
    """Add each row's unpadded token ids (and its label) to ``digest`` (as the driver's worker does for ours)."""
    for ids, mask, label in zip(batch["input_ids"], batch["attention_mask"], batch["label"], strict=True):
        digest.update(ids[mask.bool()].numpy().astype("int64").tobytes() + int(label).to_bytes(2, "little"))


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Set up, train and evaluate as the spec says; returns the measurements."""
    import torch
    from opendelta import LoraModel
    from openprompt import PromptDataLoader, PromptForClassification
    from openprompt.data_utils.utils import InputFeatures
    from openprompt.plms import load_plm
    from openprompt.prompts import ManualTemplate, ManualVerbalizer
    from torch.utils.data import DataLoader

    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(int(spec["seed"]))
    setup_started = time.perf_counter()
    plm, tokenizer, _, wrapper_class = load_plm("bert", spec["model_path"])
    template = ManualTemplate(tokenizer=tokenizer, text=spec["template"])
    verbalizer = ManualVerbalizer(
        tokenizer,
        classes=list(spec["classes"]),
        label_words=[list(words) for words in spec["label_words"]],
        prefix=spec["prefix"],
        multi_token_handler=spec["multi_token_handler"],
        post_log_softmax=bool(spec["post_log_softmax"]),
    )
    lora = spec["lora"]
    delta = LoraModel(
        backbone_model=plm,
        lora_r=int(lora["r"]),
        lora_alpha=int(lora["alpha"]),
        lora_dropout=float(lora["dropout"]),
        modified_modules=list(lora["modified_modules"]),
    )
    delta.freeze_module(exclude=["deltas", *spec["also_trained"]], set_state_dict=True)
    start = torch.load(spec["init_state"])
    params = dict(plm.named_parameters())
    missing = sorted(set(start) - set(params))
    if missing:
        raise RuntimeError(f"the initial values name tensors this model lacks: {missing[:5]}")
    with torch.no_grad():
        for name, value in start.items():
            params[name].copy_(value)
    if spec["no_dropout"]:  # the driver's control run: dropout off in both systems
        for module in plm.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    prompt_model = PromptForClassification(plm=plm, template=template, verbalizer=verbalizer)
    trainable = [p for p in prompt_model.parameters() if p.requires_grad]
    loader_options = {
        "template": template,
        "tokenizer": tokenizer,
        "tokenizer_wrapper_class": wrapper_class,
        "max_seq_length": int(spec["max_seq_length"]),
        "truncate_method": spec["truncate_method"],
    }
    train_loader = PromptDataLoader(
        dataset=_examples(spec["train_rows"]), batch_size=int(spec["batch_size"]), shuffle=False, **loader_options
    )
    # the same batches in the same order as our run: OpenPrompt's features and collate, our sampler's order
    train_loader.dataloader = DataLoader(
        train_loader.tensor_dataset, batch_sampler=spec["train_batches"], collate_fn=InputFeatures.collate_fct
    )
    dev_loader = PromptDataLoader(
        dataset=_examples(spec["dev_rows"]), batch_size=int(spec["eval_batch_size"]), shuffle=False, **loader_options
    )
    optimizer = torch.optim.AdamW(
        trainable,
        lr=float(spec["lr"]),
        betas=tuple(spec["betas"]),
        eps=float(spec["eps"]),
        weight_decay=float(spec["weight_decay"]),
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    setup_s = time.perf_counter() - setup_started

    setup_peak_kb = common.peak_rss_kb()
    baseline_kb, _ = common.memory_baseline()
    common.reset_peak_rss()
    step_s, losses = [], []
    train_digest = hashlib.sha256()
    prompt_model.train()
    train_started, train_cpu = time.perf_counter(), time.process_time()
    for batch in train_loader:
        _ids_hash(train_digest, batch)
        t = time.perf_counter()
        logits = prompt_model(batch)
        loss = loss_fn(logits, batch["label"])
        loss.backward()
        if spec["max_grad_norm"] is not None:
            torch.nn.utils.clip_grad_norm_(trainable, float(spec["max_grad_norm"]))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        step_s.append(time.perf_counter() - t)
    train_s, train_cpu_s = time.perf_counter() - train_started, time.process_time() - train_cpu

    prompt_model.eval()
    correct = total = 0
    loss_sum = 0.0
    eval_started, eval_cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for batch in dev_loader:
            logits = prompt_model(batch)
            labels = batch["label"]
            correct += int((logits.argmax(dim=-1) == labels).sum())
            total += int(labels.numel())
            loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
    eval_s, eval_cpu_s = time.perf_counter() - eval_started, time.process_time() - eval_cpu
    train_eval_peak_kb = common.peak_rss_kb()
    dev_digest = hashlib.sha256()
    for batch in dev_loader:
        _ids_hash(dev_digest, batch)
    if "opendelta_dist" in sys.modules:
        raise RuntimeError("the reference run imported opendelta_dist")
    return {
        "system": "openprompt",
        "seed": int(spec["seed"]),
        "dev_accuracy": correct / total,
        "dev_loss": loss_sum / total,
        "dev_correct": correct,
        "dev_total": total,
        "train_s": train_s,
        "eval_s": eval_s,
        "train_eval_s": train_s + eval_s,
        "train_cpu_s": train_cpu_s,
        "eval_cpu_s": eval_cpu_s,
        "setup_s": setup_s,
        "imports_s": setup_started - STARTED,
        "step_s": step_s,
        "loss": losses,
        "trainable_params": sum(p.numel() for p in trainable),
        "train_padded_length": int(next(iter(train_loader))["input_ids"].shape[1]),
        "train_data_sha256": train_digest.hexdigest(),
        "dev_data_sha256": dev_digest.hexdigest(),
        **common.memory_fields(setup_peak_kb, baseline_kb, train_eval_peak_kb),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    """Read the spec named on the command line, run, write the result where the spec says."""
    if len(sys.argv) != 2:
        raise SystemExit("usage: openprompt_runner.py SPEC.json (benchmarks/prompt_sst2.py writes it)")
    spec = json.loads(Path(sys.argv[1]).read_text())
    warnings.filterwarnings("ignore")  # transformers' FutureWarnings about OpenPrompt's old imports
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(spec)
    Path(spec["output"]).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
