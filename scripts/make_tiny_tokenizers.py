"""Writes the tiny hand-made tokenizers of ``tests/assets/tokenizers/{bert,roberta,gpt2,t5}/``.

Each directory loads with ``transformers.AutoTokenizer.from_pretrained(dir)`` in the project's environment
(transformers 5) and in the side environment of ``scripts/openprompt-fixtures.sh`` (transformers 4.39.3), and both
give the same ids. The vocabularies are small and written by hand: the words of few-shot sentiment and topic
prompts, every single character (so no text falls back to an unknown token), and a few label words that split
into several sub-tokens (``terrible``, ``horrible``, ``wonderful``) so that multi-token label words are exercised.

* ``bert``: WordPiece, lower-cased (``vocab.txt``: ``[PAD] [UNK] [CLS] [SEP] [MASK]`` then characters, words, pieces).
* ``roberta``: byte-level BPE (``vocab.json`` + ``merges.txt``) with ``<s> <pad> </s> <unk>`` first and ``<mask>`` last.
* ``gpt2``: the same byte-level BPE with ``<|endoftext|>`` (bos, eos, unk) and a ``<pad>`` token at the end.
* ``t5``: Unigram (``tokenizer.json``) with ``<pad>=0, </s>=1, <unk>=2`` and ``<extra_id_0..9>`` as the last ids
  (``<extra_id_0>`` last, as in the real T5).

Usage, from the repository root::

    python scripts/make_tiny_tokenizers.py            # (re)write tests/assets/tokenizers/ (deterministic)
    python scripts/make_tiny_tokenizers.py --verify   # load each with AutoTokenizer, compare with sample_ids.json

``sample_ids.json`` holds the ids of sample texts computed with the ``tokenizers`` pipelines built here; ``--verify``
exits 1 when the installed transformers gives other ids (run it in both environments).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "assets" / "tokenizers"

_WORDS_TEXT = (
    "a an the this that it is was be been are not no yes maybe and but or so very really just too quite "
    "i you we they he she my your movie film story plot acting actors music scene ending review "
    "good great bad fine nice awful boring fun funny best worst love loved like liked hate hated "
    "positive negative neutral true false correct wrong sentiment topic question answer premise hypothesis "
    "sports business science world politics news tech about of to in on at with for as by from what which "
    "how why all one two three time thing watch again never ever more than summary text title label class "
    "It The This I A What"
)
#: the words every tokenizer knows as one token (with a leading space for the BPE and Unigram tokenizers)
WORDS = tuple(_WORDS_TEXT.split())
#: label words that are NOT one token: word -> (first piece, continuation piece)
MULTI = {"terrible": ("terr", "ible"), "horrible": ("horr", "ible"), "wonderful": ("wonder", "ful")}
#: words the BPE tokenizers also know without a leading space (a text that starts with them)
BARE_WORDS = ("It", "The", "This", "I", "A", "the", "this", "it", "a")
PUNCT = ".,!?;:'\"-()[]/&%$#@*+=<>_`~^|\\{}"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"

#: texts whose ids ``sample_ids.json`` records and ``--verify`` compares
SAMPLES = (
    "It was",
    " good",
    " great",
    " bad",
    " terrible",
    " horrible",
    " wonderful",
    "the movie is good.",
    "This is not a good movie, it is terrible!",
    "yes no maybe",
    " yes",
    " no",
    " maybe",
    "The story was boring but the acting was great.",
    "premise: a man sings. hypothesis: nobody sings?",
    "Unseen words like xylophone 42 split into pieces.",
    "double  space and\ttab",
    "sports news about the world cup",
    "",
    " ",
    ".",
    " It was",
    " Question:",
    "? Answer:",
    " bad terrible movie ",
    "<mask> [MASK] <extra_id_0> <pad>",
)

SPECIAL = {"bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]}
T5_EXTRA_IDS = 10


def bytes_to_unicode() -> dict[int, str]:
    """Return the byte-level BPE alphabet: every byte mapped to one printable character (GPT-2's mapping).

    Returns:
        ``{byte: character}`` for the 256 bytes, printable ASCII and Latin-1 bytes mapped to themselves.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(mapping.items()))


def _chain(token: str, start: int) -> list[tuple[str, str]]:
    """Merges that build ``token`` left to right from its first ``start`` characters (as one symbol)."""
    return [(token[:i], token[i]) for i in range(start, len(token))]


def bpe_vocab_and_merges() -> tuple[list[str], list[tuple[str, str]]]:
    """Build the byte-level BPE vocabulary and merges shared by the RoBERTa and GPT-2 tokenizers.

    Merges that grow a space-prefixed word (``Ġ`` + letters) come first, so such a word always becomes one
    token when its whole chain exists; then the bare-word and continuation-piece merges.

    Returns:
        The vocabulary (without special tokens) in id order, and the merges in priority order.
    """
    space = bytes_to_unicode()[ord(" ")]
    prefixed = [space + w for w in WORDS] + [space + first for first, _ in MULTI.values()]
    bare = list(BARE_WORDS) + sorted({rest for _, rest in MULTI.values()})
    merges: list[tuple[str, str]] = []
    for group in (prefixed, bare):
        for token in group:
            for merge in _chain(token, 1):
                if merge not in merges:
                    merges.append(merge)
    vocab = list(bytes_to_unicode().values())
    for left, right in merges:
        if left + right not in vocab:
            vocab.append(left + right)
    return vocab, merges


def wordpiece_vocab() -> list[str]:
    """Return the BERT WordPiece vocabulary in id order (special tokens first)."""
    chars = list(LETTERS + DIGITS + PUNCT)
    vocab = SPECIAL["bert"] + chars + ["##" + c for c in LETTERS + DIGITS]
    for word in [w.lower() for w in WORDS] + [first for first, _ in MULTI.values()]:
        if word not in vocab:
            vocab.append(word)
    for _, rest in MULTI.values():
        if "##" + rest not in vocab:
            vocab.append("##" + rest)
    return vocab


def unigram_vocab() -> list[tuple[str, float]]:
    """Return the T5 Unigram vocabulary ``(piece, log-probability)`` in id order.

    Words score -5, single characters -10: a known word is one piece, anything else falls back to pieces
    and characters. ``<extra_id_9> .. <extra_id_0>`` are the last ids.
    """
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -10.0)]
    seen = {p for p, _ in vocab}
    pieces = ["▁" + w for w in WORDS] + ["▁" + first for first, _ in MULTI.values()]
    pieces += sorted({rest for _, rest in MULTI.values()})
    for piece in pieces:
        if piece not in seen:
            vocab.append((piece, -5.0))
            seen.add(piece)
    for char in LETTERS + LETTERS.upper() + DIGITS + PUNCT:
        if char not in seen:
            vocab.append((char, -10.0))
            seen.add(char)
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    return vocab


def _added(token_ids: dict[str, int], lstrip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The ``added_tokens_decoder`` entry of a tokenizer_config.json (special tokens, not normalised)."""
    return {
        str(i): {
            "content": tok,
            "lstrip": tok in lstrip,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok, i in sorted(token_ids.items(), key=lambda kv: kv[1])
    }


def build_all() -> dict[str, tuple[Any, dict[str, str]]]:
    """Build the four tokenizers with the ``tokenizers`` library.

    Returns:
        ``family -> (tokenizers.Tokenizer, {file name: file text})``: the pipeline used for ``sample_ids.json``
        and the files to write.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE, Unigram, WordPiece

    built: dict[str, tuple[Any, dict[str, str]]] = {}

    # BERT: WordPiece, lower case
    vocab = wordpiece_vocab()
    ids = {tok: i for i, tok in enumerate(vocab)}
    bert = Tokenizer(WordPiece(ids, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100))
    bert.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    bert.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    bert.post_processor = processors.BertProcessing(("[SEP]", ids["[SEP]"]), ("[CLS]", ids["[CLS]"]))
    bert.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL["bert"]])
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "tokenize_chinese_chars": True,
        "strip_accents": None,
        "clean_up_tokenization_spaces": True,
        "model_max_length": 512,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "added_tokens_decoder": _added({t: ids[t] for t in SPECIAL["bert"]}),
    }
    built["bert"] = (bert, {"vocab.txt": "".join(t + "\n" for t in vocab), "tokenizer_config.json": _json(config)})

    # RoBERTa and GPT-2: byte-level BPE over the same merges
    base, merges = bpe_vocab_and_merges()
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    for family, head, tail in (
        ("roberta", ["<s>", "<pad>", "</s>", "<unk>"], ["<mask>"]),
        ("gpt2", ["<|endoftext|>"], ["<pad>"]),
    ):
        vocab = head + base + tail
        ids = {tok: i for i, tok in enumerate(vocab)}
        tok = Tokenizer(
            BPE(ids, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
        )
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = head + tail
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        if family == "roberta":
            tok.post_processor = processors.RobertaProcessing(
                ("</s>", ids["</s>"]), ("<s>", ids["<s>"]), trim_offsets=True, add_prefix_space=False
            )
            config = {
                "tokenizer_class": "RobertaTokenizer",
                "add_prefix_space": False,
                "errors": "replace",
                "trim_offsets": True,
                "clean_up_tokenization_spaces": True,
                "model_max_length": 512,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "sep_token": "</s>",
                "cls_token": "<s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "mask_token": "<mask>",
                "added_tokens_decoder": _added({t: ids[t] for t in specials}, lstrip=("<mask>",)),
            }
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
            config = {
                "tokenizer_class": "GPT2Tokenizer",
                "add_prefix_space": False,
                "add_bos_token": False,
                "errors": "replace",
                "clean_up_tokenization_spaces": True,
                "model_max_length": 1024,
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<pad>",
                "added_tokens_decoder": _added({t: ids[t] for t in specials}),
            }
        files = {
            "vocab.json": json.dumps(ids, ensure_ascii=False) + "\n",
            "merges.txt": merges_txt,
            "tokenizer_config.json": _json(config),
        }
        built[family] = (tok, files)

    # T5: Unigram, written as tokenizer.json (the pipeline transformers 5's T5Tokenizer rebuilds from it)
    vocab_scores = unigram_vocab()
    ids = {p: i for i, (p, _) in enumerate(vocab_scores)}
    t5 = Tokenizer(Unigram(vocab_scores, unk_id=ids["<unk>"], byte_fallback=False))
    t5.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    t5.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    t5.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", ids["</s>"])]
    )
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    t5_specials = ["<pad>", "</s>", "<unk>", *reversed(extra)]
    t5.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in t5_specials])
    config = {
        "tokenizer_class": "T5Tokenizer",
        "extra_ids": T5_EXTRA_IDS,
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": True,
        "model_max_length": 512,
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "added_tokens_decoder": _added({t: ids[t] for t in t5_specials}),
    }
    built["t5"] = (t5, {"tokenizer.json": _portable_tokenizer_json(t5), "tokenizer_config.json": _json(config)})
    return built


def _portable_tokenizer_json(tok: Any) -> str:
    """Serialise a tokenizer so that both tokenizers 0.15 (transformers 4.39) and 0.23 read it.

    Newer ``tokenizers`` write ``Metaspace`` with ``split`` and without ``add_prefix_space``; 0.15 requires
    ``add_prefix_space``. Both fields are written (0.15 ignores ``split``; newer versions accept the legacy field).
    """
    data = json.loads(tok.to_str())

    def patch(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "Metaspace":
                node["add_prefix_space"] = True
            for value in node.values():
                patch(value)
        elif isinstance(node, list):
            for value in node:
                patch(value)

    patch(data)
    return json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n"


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n"


def expected_pieces(family: str) -> dict[str, list[str]]:
    """The tokens each vocabulary word must become (``build_all`` checks them).

    Args:
        family: ``bert``, ``roberta``, ``gpt2`` or ``t5``.

    Returns:
        ``{text: tokens}`` for every word of ``WORDS`` and ``MULTI`` (and ``BARE_WORDS`` for the BPE tokenizers).
    """
    out: dict[str, list[str]] = {}
    if family == "bert":
        out.update({w: [w.lower()] for w in WORDS})
        out.update({w: [a, "##" + b] for w, (a, b) in MULTI.items()})
    elif family == "t5":
        out.update({w: ["▁" + w] for w in WORDS})
        out.update({w: ["▁" + a, b] for w, (a, b) in MULTI.items()})
    else:
        out.update({" " + w: ["Ġ" + w] for w in WORDS})
        out.update({" " + w: ["Ġ" + a, b] for w, (a, b) in MULTI.items()})
        out.update({w: [w] for w in BARE_WORDS})
    return out


def sample_ids(built: dict[str, tuple[Any, dict[str, str]]]) -> dict[str, Any]:
    """Ids of ``SAMPLES`` with and without special tokens, from the ``tokenizers`` pipelines.

    Args:
        built: what ``build_all`` returns.

    Returns:
        ``{family: [{"text", "tokens", "ids", "ids_with_special"}, ...]}``.
    """
    out: dict[str, Any] = {}
    for family, (tok, _) in built.items():
        rows = []
        for text in SAMPLES:
            plain = tok.encode(text, add_special_tokens=False)
            rows.append(
                {
                    "text": text,
                    "tokens": plain.tokens,
                    "ids": plain.ids,
                    "ids_with_special": tok.encode(text).ids,
                }
            )
        out[family] = rows
    return out


def write() -> None:
    """Build, check and write every tokenizer directory, the README aside."""
    built = build_all()
    for family, (tok, files) in built.items():
        for text, pieces in expected_pieces(family).items():
            got = tok.encode(text, add_special_tokens=False).tokens
            if got != pieces:
                raise SystemExit(f"{family}: {text!r} -> {got}, expected {pieces}: fix the vocabulary or the merges")
        folder = OUT / family
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            if stale.name not in files:
                stale.unlink()
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")
        print(f"{family}: {tok.get_vocab_size()} tokens -> {folder.relative_to(ROOT)}")
    (OUT / "sample_ids.json").write_text(_json({"samples": sample_ids(built)}), encoding="utf-8")


def verify() -> int:
    """Load every directory with ``AutoTokenizer`` and compare its ids with ``sample_ids.json``.

    Returns:
        The number of mismatches (0 when the installed transformers agrees with the recorded ids).
    """
    import transformers

    expected = json.loads((OUT / "sample_ids.json").read_text(encoding="utf-8"))["samples"]
    bad = 0
    for family, rows in expected.items():
        for use_fast in (True, False):
            try:
                tok = transformers.AutoTokenizer.from_pretrained(str(OUT / family), use_fast=use_fast)
            except (ImportError, OSError, ValueError, TypeError) as e:  # a slow class needing sentencepiece
                print(f"{family}: no slow tokenizer here ({type(e).__name__})")
                continue
            for row in rows:
                plain = tok.encode(row["text"], add_special_tokens=False)
                full = tok.encode(row["text"])
                if plain != row["ids"] or full != row["ids_with_special"]:
                    bad += 1
                    want = f"{row['ids']} / {row['ids_with_special']}"
                    print(f"MISMATCH {family} {type(tok).__name__} {row['text']!r}: {plain} / {full}, expected {want}")
            print(f"{family}: {type(tok).__name__}, len {len(tok)}, pad {tok.pad_token_id}, checked {len(rows)} texts")
    print(f"transformers {transformers.__version__}: {bad} mismatches")
    return bad


def main(argv: list[str] | None = None) -> None:
    """Write the tokenizers, or verify them with ``--verify`` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verify", action="store_true", help="load with AutoTokenizer and compare ids; write nothing")
    args = parser.parse_args(argv)
    if args.verify:
        sys.exit(1 if verify() else 0)
    write()


if __name__ == "__main__":
    main()
