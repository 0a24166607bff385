"""Training data: read rows, tokenize them, and cut them into per-rank batches that survive a restart.

The pipeline, as data::

    DataConfig --load_rows--> [{"input": str, "target": str | int}, ...]
               --TokenizedDataset(rows, tokenizer, config)--> items of token ids
               --batching.build_dataloader (ShardedBatchSampler + collate)--> padded tensor batches for one rank

Rows come from local files (jsonl, json, csv, tsv; read with the standard library), from the
embedded ``tiny_t2t`` set (``DATA_DIR``), or from a ``datasets`` hub name when that package is
installed and the network allows. Every problem with the data is a :class:`DataError` that names
the file, the line and the fix.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.utils.data import Dataset

from opendelta_dist.errors import OpenDeltaError
from opendelta_dist.train.models import is_local_path, resolve_name_or_path

DATA_DIR = Path(__file__).parent / "assets" / "tiny_t2t"
"""The embedded default data set: ``train.jsonl`` and ``dev.jsonl`` with ``input``/``target`` fields."""

FORMATS = ("jsonl", "json", "csv", "tsv")
TARGETS = ("class", "text")
"""What a row's target becomes: a class id, or text (a task's ``targets``)."""
SPLITS = ("train", "eval")
IGNORE_INDEX = -100
"""Label value that losses and metrics skip (padding of seq2seq targets)."""

_EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
_HUB_SPLITS = {"train": ("train",), "eval": ("validation", "test")}


class DataError(OpenDeltaError, ValueError):
    """Training data is missing, unreadable, or does not fit the data configuration."""


@dataclass
class DataConfig:
    """Where the data comes from and how it becomes model inputs.

    Attributes:
        name: ``"tiny_t2t"`` selects the embedded set (used only when no file and no hub name is given).
        train_file: local file of training rows. When either file is set, both splits come from files.
        eval_file: local file of evaluation rows.
        hub_name: a ``datasets`` hub name (needs the ``datasets`` package and the network).
        hub_config: the hub data set's configuration name, if it has several.
        format: ``jsonl``, ``json`` (an array of objects), ``csv`` or ``tsv``; inferred from the extension.
        task: the task (``opendelta_dist/train/tasks``): ``seq2seq`` and ``prompt_generation`` read targets as text,
            ``classification`` and ``prompt_classification`` as class ids.
        input_column: the column holding the input text.
        target_column: the column holding the target text or label.
        label_names: classification: the class names; a label value that is one of them (or an
            integer index into them) becomes that class id. seq2seq: integer label ``i`` becomes the
            target text ``label_names[i]`` (SST-2's ``label`` 0/1 -> ``"negative"``/``"positive"``).
        max_length: inputs are truncated to this many tokens.
        max_target_length: seq2seq targets (with their end-of-sequence token) must fit in this many
            tokens; a longer one is an error, since a truncated target can never be matched exactly.
        max_train_rows: keep only this many training rows: the first ones of a permutation of the
            file seeded with ``shuffle_seed``.
        train_rows_per_class: few-shot training: keep the first this many rows of each class in a permutation
            of the file seeded with ``shuffle_seed`` (class targets only; with ``max_train_rows``, applied first).
        max_eval_rows: keep only the first this many evaluation rows, in file order.
        shuffle_seed: seed of the permutation used with ``max_train_rows`` (and ``eval_split``).
        eval_split: with a ``train_file`` and no ``eval_file``: the fraction of the training file's rows held out
            for evaluation (a permutation seeded with ``shuffle_seed``); the rest train.
    """

    name: str = "tiny_t2t"
    train_file: str | None = None
    eval_file: str | None = None
    hub_name: str | None = None
    hub_config: str | None = None
    format: str | None = None
    task: str = "seq2seq"
    input_column: str = "input"
    target_column: str = "target"
    label_names: list[str] | None = None
    max_length: int = 128
    max_target_length: int = 8
    max_train_rows: int | None = None
    train_rows_per_class: int | None = None
    max_eval_rows: int | None = None
    shuffle_seed: int = 0
    eval_split: float | None = None


# ----------------------------------------------------------------------------------------- reading rows


def load_rows(config: DataConfig, split: str, targets: str | None = None) -> list[dict[str, Any]]:
    """Read one split and turn every row into ``{"input": str, "target": str | int}``.

    The target is a class id (``targets="class"``) or text (``targets="text"``); None means text for
    ``task="seq2seq"`` and a class id otherwise (a task passes its own, ``Task.targets``).
    Training rows are permuted with ``shuffle_seed`` and truncated when ``max_train_rows`` is set;
    evaluation rows are truncated to ``max_eval_rows`` in file order.

    Args:
        config: the data configuration.
        split: ``"train"`` or ``"eval"``.
        targets: ``"class"`` or ``"text"``.

    Returns:
        The normalised rows.

    Raises:
        DataError: unknown split or targets, a missing file, an unknown format, a missing column, an
            empty file, a malformed row (with its line number), or a hub data set that cannot be loaded.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    targets = targets or _default_targets(config.task)
    if targets not in TARGETS:
        raise DataError(f"unknown targets {targets!r}; use one of {', '.join(TARGETS)}")
    held_out = config.eval_split is not None and config.train_file is not None and config.eval_file is None
    raw, source = _read_split(config, "train" if held_out else split)
    if not raw:
        raise DataError(f"{source} has no rows; fill it or point DataConfig at another file")
    rows = [_normalise(config, values, where, targets) for values, where in raw]
    if held_out:
        rows = _held_out(rows, config, split)
    if split == "train" and config.train_rows_per_class is not None:
        rows = _per_class(rows, config, targets)
    if split == "train" and config.max_train_rows is not None:
        generator = torch.Generator().manual_seed(config.shuffle_seed)
        order = torch.randperm(len(rows), generator=generator).tolist()
        rows = [rows[i] for i in order[: config.max_train_rows]]
    if split == "eval" and config.max_eval_rows is not None:
        rows = rows[: config.max_eval_rows]
    return rows


def _per_class(rows: list[dict[str, Any]], config: DataConfig, targets: str) -> list[dict[str, Any]]:
    """The first ``train_rows_per_class`` rows of each class in a permutation seeded with ``shuffle_seed``."""
    wanted = config.train_rows_per_class
    if targets != "class":
        raise DataError(
            "data.train_rows_per_class samples rows per class, and this task's targets are text; use "
            "data.max_train_rows instead"
        )
    if wanted is None or wanted < 1:
        raise DataError(f"data.train_rows_per_class={wanted} must be at least 1 (e.g. 16), or null for all rows")
    generator = torch.Generator().manual_seed(config.shuffle_seed)
    counts: dict[int, int] = {}
    kept = []
    for i in torch.randperm(len(rows), generator=generator).tolist():
        label = rows[i]["target"]
        if counts.get(label, 0) < wanted:
            counts[label] = counts.get(label, 0) + 1
            kept.append(rows[i])
    classes = range(len(config.label_names)) if config.label_names else sorted(counts)
    short = {label: counts.get(label, 0) for label in classes if counts.get(label, 0) < wanted}
    if short:
        raise DataError(
            f"data.train_rows_per_class={wanted}, but the training rows have only {short} (class id: rows) of "
            f"class(es) {', '.join(map(str, short))}; lower it, add rows, or drop classes the data lacks from "
            "data.label_names"
        )
    return kept


def _default_targets(task: str) -> str:
    """The targets of the two plain tasks; every other task passes its own (``Task.targets``)."""
    plain = {"seq2seq": "text", "classification": "class"}
    if task not in plain:
        raise DataError(
            f"data.task={task!r}: say what its targets are (targets='class' or 'text'), as the task's Task.targets "
            "does; the plain tasks are seq2seq and classification"
        )
    return plain[task]


def _held_out(rows: list[dict[str, Any]], config: DataConfig, split: str) -> list[dict[str, Any]]:
    """``eval_split`` of the training file's rows (a permutation seeded with ``shuffle_seed``) for evaluation, in file
    order; the others for training."""
    fraction = config.eval_split
    if fraction is None or not 0 < fraction < 1:
        raise DataError(f"data.eval_split={fraction!r} must be a fraction between 0 and 1, e.g. data.eval_split=0.05")
    count = max(1, round(len(rows) * fraction))
    if count >= len(rows):
        raise DataError(f"data.eval_split={fraction} leaves no training rows out of {len(rows)}; lower it")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.shuffle_seed)).tolist()
    evaluation = set(order[:count])
    return [row for i, row in enumerate(rows) if (i in evaluation) == (split == "eval")]


def _read_split(config: DataConfig, split: str) -> tuple[list[tuple[dict[str, Any], str]], str]:
    """Pick the source of a split and read its raw rows, each with a "file, line N" location."""
    if config.train_file is not None or config.eval_file is not None:
        key = "train_file" if split == "train" else "eval_file"
        path = getattr(config, key)
        if path is None:
            other = "eval_file" if key == "train_file" else "train_file"
            raise DataError(
                f"data.{key} is not set but data.{other} is; pass data.{key}=<path> too "
                "(files are never mixed with the embedded or hub data)"
                + (", or data.eval_split=0.05 to hold out 5% of the training rows" if key == "eval_file" else "")
            )
        if config.name == "sst2" and not Path(path).is_file():
            raise DataError(
                f"{key}: GLUE SST-2 is not at {str(path)!r}: fetch it with bash scripts/get-sst2.sh (it prints the "
                "overrides), or point data.train_file=<train.tsv> data.eval_file=<dev.tsv> at your copy"
            )
        return _read_file(Path(path), config.format, key), str(path)
    if config.hub_name is not None:
        return _read_hub(config, split), f"hub data set {config.hub_name!r}"
    if config.name == "files":
        raise DataError(
            "this recipe trains on your data: pass data.train_file=<path> data.eval_file=<path> (jsonl, json, csv "
            "or tsv rows with the columns data.input_column and data.target_column)"
        )
    if config.name == "tiny_t2t":
        path = DATA_DIR / ("train.jsonl" if split == "train" else "dev.jsonl")
        return _read_file(path, "jsonl", "embedded tiny_t2t"), str(path)
    raise DataError(
        f"no data for data.name={config.name!r}: only 'tiny_t2t' is embedded; "
        "pass data.train_file=<path> data.eval_file=<path> (local files) or data.hub_name=<name>"
    )


def _read_file(path: Path, fmt: str | None, key: str) -> list[tuple[dict[str, Any], str]]:
    """Read a local file into raw rows; each row comes with its location for error messages."""
    if not path.is_file():
        raise DataError(f"{key}: file {str(path)!r} does not exist; fix the path (data.{key}=<path>)")
    if fmt is None:
        fmt = _EXTENSIONS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                f"{key}: cannot infer the format of {str(path)!r} from its extension {path.suffix!r}; "
                f"set data.format=<one of {', '.join(FORMATS)}>"
            )
    if fmt not in FORMATS:
        raise DataError(f"unknown data.format={fmt!r}; use one of {', '.join(FORMATS)}")
    with path.open(encoding="utf-8", newline="") as handle:
        if fmt == "jsonl":
            return _read_jsonl(handle, path)
        if fmt == "json":
            return _read_json(handle, path)
        return _read_delimited(handle, path, fmt)


def _read_jsonl(handle: Any, path: Path) -> list[tuple[dict[str, Any], str]]:
    rows = []
    for number, line in enumerate(handle, start=1):
        if not line.strip():  # blank lines (a trailing newline, spacing) carry no row
            continue
        where = f"{path}, line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg}); fix or remove the line") from error
        if not isinstance(value, dict):
            raise DataError(f"{where}: expected a JSON object per line, got {type(value).__name__}")
        rows.append((value, where))
    return rows


def _read_json(handle: Any, path: Path) -> list[tuple[dict[str, Any], str]]:
    try:
        value = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno}); a file with one object per line "
            "is JSON Lines: name it .jsonl or set data.format=jsonl"
        ) from error
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(value).__name__}")
    rows = []
    for number, item in enumerate(value, start=1):
        where = f"{path}, row {number}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
        rows.append((item, where))
    return rows


def _read_delimited(handle: Any, path: Path, fmt: str) -> list[tuple[dict[str, Any], str]]:
    # TSV files such as GLUE's have no quoting at all: a '"' inside a sentence is just a character
    if fmt == "tsv":
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.DictReader(handle)
    rows = []
    try:
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            extra = row.pop(None, None)  # type: ignore[call-overload]
            if extra is not None or None in row.values():
                fields = sum(value is not None for value in row.values()) + len(extra or [])
                raise DataError(
                    f"{where}: has {fields} fields but the header has {len(row)}; fix the line "
                    f"(fields of {fmt} are separated by {'a tab' if fmt == 'tsv' else 'a comma'})"
                )
            rows.append((row, where))
    except csv.Error as error:
        raise DataError(f"{path}, line {reader.line_num}: unreadable {fmt} ({error})") from error
    return rows


def _read_hub(config: DataConfig, split: str) -> list[tuple[dict[str, Any], str]]:
    """Load a split of a ``datasets`` hub data set (train -> "train"; eval -> "validation", else "test")."""
    try:
        import datasets
    except ImportError as error:
        raise DataError(
            f"hub_name={config.hub_name!r} needs the `datasets` package, which is not installed; "
            "pip install datasets, or download the files and pass data.train_file=<path> data.eval_file=<path>"
        ) from error
    try:
        splits = datasets.load_dataset(config.hub_name, config.hub_config)
    except Exception as error:  # offline, unknown name, bad config: all end the same way for the user
        raise DataError(
            f"could not load hub data set {config.hub_name!r} (config {config.hub_config!r}): {error}; "
            "check the name and the network, or download the files and pass data.train_file=<path> "
            "data.eval_file=<path>"
        ) from error
    for name in _HUB_SPLITS[split]:
        if name in splits:
            rows = enumerate(splits[name], start=1)
            return [(dict(row), f"hub {config.hub_name!r} split {name!r}, row {i}") for i, row in rows]
    wanted = " or ".join(repr(name) for name in _HUB_SPLITS[split])
    raise DataError(
        f"hub data set {config.hub_name!r} has no split {wanted} "
        f"(it has {', '.join(splits)}); pass local files with train_file/eval_file"
    )


def _normalise(config: DataConfig, values: dict[str, Any], where: str, targets: str) -> dict[str, Any]:
    """Turn one raw row into ``{"input": text, "target": text or class id}``."""
    for column in (config.input_column, config.target_column):
        if column not in values:
            raise DataError(
                f"{where}: no column {column!r} (columns present: {', '.join(map(str, values))}); "
                "name them with data.input_column=<column> data.target_column=<column>"
            )
    text = values[config.input_column]
    if not isinstance(text, str):
        raise DataError(f"{where}: input {config.input_column!r} must be text, got {text!r}")
    label = values[config.target_column]
    if targets == "class":
        return {"input": text, "target": _class_id(label, config.label_names, where)}
    return {"input": text, "target": _target_text(label, config.label_names, where)}


def _as_int(value: Any) -> int | None:
    """An integer label from JSON (int) or a text file ("1", " 1 "); None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _class_id(label: Any, label_names: list[str] | None, where: str) -> int:
    """Map a classification label (a class name, or an integer class id) to a class id."""
    if label_names is not None and isinstance(label, str) and label in label_names:
        return label_names.index(label)
    index = _as_int(label)
    if index is None:
        known = f"one of {label_names}" if label_names is not None else "an integer class id"
        raise DataError(f"{where}: label {label!r} is not {known}; fix the row or data.label_names")
    if index < 0 or (label_names is not None and index >= len(label_names)):
        raise DataError(
            f"{where}: class id {index} is out of range for label_names {label_names}; "
            "fix the row or add the missing names"
        )
    return index


def _target_text(label: Any, label_names: list[str] | None, where: str) -> str:
    """Map a seq2seq target to text: itself, or ``label_names[i]`` for an integer label ``i``."""
    if label_names is not None:
        index = _as_int(label)
        if index is not None:
            if not 0 <= index < len(label_names):
                raise DataError(
                    f"{where}: label {index} has no name in label_names {label_names}; "
                    "fix the row or add the missing names"
                )
            return label_names[index]
    if isinstance(label, str):
        return label
    if isinstance(label, int) and not isinstance(label, bool):
        return str(label)
    raise DataError(f"{where}: target {label!r} must be text (or an integer with data.label_names)")


# ----------------------------------------------------------------------------------------- tokenizing


def build_tokenizer(model_name_or_path: str | None) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer of a model: a local directory or hub name, or the file-less byte-level ByT5 tokenizer.

    Args:
        model_name_or_path: ``None`` or ``"byt5"`` for ``ByT5Tokenizer()`` (bytes + 3 special tokens and
            125 sentinels: 384 ids, pad 0, eos 1); a ``pkg://PACKAGE/SUBDIR`` name (see
            ``models.resolve_name_or_path``); otherwise passed to ``AutoTokenizer.from_pretrained``.

    Returns:
        The tokenizer.

    Raises:
        DataError: the tokenizer could not be loaded (missing directory, no network for a hub name).
        DeltaConfigError: a ``pkg://`` name's package is not installed.
    """
    if model_name_or_path is None or model_name_or_path == "byt5":
        return transformers.ByT5Tokenizer()
    model_name_or_path = resolve_name_or_path(model_name_or_path)
    # A path-looking name that is not there would otherwise be retried as a hub name (slow offline)
    if is_local_path(model_name_or_path) and not Path(model_name_or_path).expanduser().is_dir():
        raise DataError(f"tokenizer directory {model_name_or_path!r} does not exist; fix the path")
    try:
        return transformers.AutoTokenizer.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as error:
        raise DataError(
            f"could not load a tokenizer from {model_name_or_path!r} ({error}); pass a local directory "
            "holding the tokenizer files, a reachable hub name, or None for the byte-level tokenizer"
        ) from error


class TokenizedDataset(Dataset):
    """Rows tokenized once, up front; item ``i`` holds the token ids of row ``i``.

    An item is ``{"input_ids": list[int], "attention_mask": list[int], "labels": list[int] | int}``:
    the target's token ids (with end-of-sequence) for seq2seq, the class id for classification.
    The raw rows stay available as ``dataset.rows`` (``rows[i]["target"]`` is the target text).
    """

    def __init__(
        self,
        rows: list[dict[str, Any]],
        tokenizer: transformers.PreTrainedTokenizerBase,
        config: DataConfig,
        targets: str | None = None,
    ) -> None:
        """Tokenize every row.

        Args:
            rows: rows from :func:`load_rows` (``{"input": str, "target": str | int}``).
            tokenizer: the model's tokenizer.
            config: gives ``max_length`` and ``max_target_length``.
            targets: ``"text"`` (tokenized) or ``"class"`` (class ids); None: as :func:`load_rows` infers it.

        Raises:
            DataError: no rows, a seq2seq target longer than ``max_target_length`` tokens, or a target
                of the wrong type for the task.
        """
        if not rows:
            raise DataError("no rows to tokenize; load them with load_rows")
        self.rows = rows
        targets = targets or _default_targets(config.task)
        inputs = tokenizer([row["input"] for row in rows], truncation=True, max_length=config.max_length)
        self.input_ids: list[list[int]] = inputs["input_ids"]
        self.attention_mask: list[list[int]] = inputs["attention_mask"]
        if targets == "text":
            self.labels: list[Any] = self._tokenize_targets(rows, tokenizer, config.max_target_length)
        else:
            self.labels = [row["target"] for row in rows]
            bad = next((t for t in self.labels if not isinstance(t, int) or isinstance(t, bool)), None)
            if bad is not None:
                raise DataError(f"classification target {bad!r} is not a class id; build rows with load_rows")

    @staticmethod
    def _tokenize_targets(
        rows: list[dict[str, Any]], tokenizer: transformers.PreTrainedTokenizerBase, max_target_length: int
    ) -> list[list[int]]:
        # Targets repeat a lot (class names as text), so each distinct one is tokenized once
        distinct = sorted({row["target"] for row in rows})
        ids = dict(zip(distinct, tokenizer(distinct)["input_ids"]))
        longest = max(distinct, key=lambda t: len(ids[t]))
        if len(ids[longest]) > max_target_length:
            raise DataError(
                f"target {longest!r} is {len(ids[longest])} tokens (with end-of-sequence) but "
                f"data.max_target_length is {max_target_length}; set data.max_target_length={len(ids[longest])} "
                "(or more), or shorten the targets"
            )
        return [ids[row["target"]] for row in rows]

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The token ids of row ``index``."""
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


def collate(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of items to the longest in the batch (right padding).

    Args:
        batch: items of a :class:`TokenizedDataset`.
        pad_token_id: the id padding ``input_ids`` (``attention_mask`` pads with 0). Seq2seq
            ``labels`` pad with ``IGNORE_INDEX`` (-100) so the loss skips them.

    Returns:
        ``input_ids``, ``attention_mask`` (long, ``[batch, length]``) and ``labels`` (long,
        ``[batch, target length]`` for seq2seq, ``[batch]`` for classification): what the model's
        forward takes, and nothing else.

    Raises:
        DataError: the batch is empty.
    """
    if not batch:
        raise DataError("cannot collate an empty batch")

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(row) for row in rows)
        return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)

    labels = [item["labels"] for item in batch]
    return {
        "input_ids": pad([item["input_ids"] for item in batch], pad_token_id),
        "attention_mask": pad([item["attention_mask"] for item in batch], 0),
        "labels": pad(labels, IGNORE_INDEX) if isinstance(labels[0], list) else torch.tensor(labels, dtype=torch.long),
    }
