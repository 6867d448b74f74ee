#!/usr/bin/env python3
"""Builds the genuine Llama 2 `tokenizer.json` (Hugging Face tokenizers format) from the npm
package llama-tokenizer-js@1.2.2, using only the standard library.

The package's `llama-tokenizer.js` carries Meta's Llama 2 vocabulary as two base64 constants,
dumped from the LLaMA `tokenizer.json` (see its data-conversion.py):
  - llama_vocab_base64: the 32,000 pieces, UTF-8, joined by "\\n", in id order;
  - llama_merges_binary: the BPE merges in rank order, each two little-endian uint16 token ids.
This script turns them back into the layout transformers ships for meta-llama/Llama-2-7b-hf:
BPE with byte fallback, the "▁" normalizer, `<s>` prepended, and the SentencePiece-style decoder.
The output is byte-identical from run to run (scripts/fetch-assets.sh checks its sha256).

Usage: llama2_tokenizer.py PATH/TO/llama-tokenizer.js OUT/tokenizer.json
"""
import base64
import json
import os
import re
import struct
import sys

VOCAB_SIZE = 32000
SPECIALS = [("<unk>", 0), ("<s>", 1), ("</s>", 2)]


def constant(source: str, name: str) -> bytes:
    """The base64 string constant `name` of the package's source, decoded."""
    m = re.search(r'const\s+' + name + r'\s*=\s*"([A-Za-z0-9+/=]+)"', source)
    if m is None:
        sys.exit(f"llama2_tokenizer: constant {name} not found in the package source")
    return base64.b64decode(m.group(1))


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src_path, out_path = sys.argv[1], sys.argv[2]
    with open(src_path, encoding="utf-8") as f:
        source = f.read()
    pieces = constant(source, "llama_vocab_base64").decode("utf-8").split("\n")
    if len(pieces) != VOCAB_SIZE:
        sys.exit(f"llama2_tokenizer: {len(pieces)} pieces in {src_path}, expected {VOCAB_SIZE}")
    if len(set(pieces)) != VOCAB_SIZE:
        sys.exit(f"llama2_tokenizer: duplicate pieces in {src_path}")
    for piece, id_ in SPECIALS:
        if pieces[id_] != piece:
            sys.exit(f"llama2_tokenizer: id {id_} is {pieces[id_]!r}, expected {piece!r}")
    raw = constant(source, "llama_merges_binary")
    if len(raw) % 4:
        sys.exit(f"llama2_tokenizer: merges are {len(raw)} bytes, not a multiple of 4")
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    merges = []
    for i in range(0, len(ids), 2):
        left, right = ids[i], ids[i + 1]
        if left >= VOCAB_SIZE or right >= VOCAB_SIZE:
            sys.exit(f"llama2_tokenizer: merge {i // 2} names id {max(left, right)}")
        merges.append(f"{pieces[left]} {pieces[right]}")
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": id_,
                "content": piece,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for piece, id_ in SPECIALS
        ],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {piece: id_ for id_, piece in enumerate(pieces)},
            "merges": merges,
        },
    }
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        json.dump(tokenizer, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main()
