# finetune-operator: the two commands of the Quick start are `make demo` and `make test`.
# Everything they need (apt packages, the Kubernetes binaries, data, tokenizer) is installed or
# built on first use and cached under $(CACHE_DIR).

SHELL := /bin/bash
CARGO ?= cargo
CACHE_DIR ?= $(HOME)/.cache/finetune-operator
export CACHE_DIR
OPERATOR_IMAGE ?= ghcr.io/finetune-operator/operator:0.1.0
FETCH_IMAGE ?= ghcr.io/finetune-operator/fetch:0.1.0
TRAINER_IMAGE ?= ghcr.io/finetune-operator/trainer:0.1.0
TRAINER_CUDA_IMAGE ?= ghcr.io/finetune-operator/trainer:0.1.0-cuda

.PHONY: all build test test-unit test-e2e lint fmt crds crds-check cuda-build cuda-check gpu-check demo bench soak supply-chain assets images clean help

all: build

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

build: ## Build every crate.
	$(CARGO) build --workspace --all-targets

test: ## Run every test (unit, API, cluster end-to-end, trainer, operator end-to-end, faults, security).
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast
	scripts/fuzz.sh smoke
	$(MAKE) supply-chain

test-unit: ## The fast tests: API, formats, operator (decide table, builders) and trainer; no cluster.
	$(CARGO) test -p finetune-api -p finetune-formats -p finetune-operator -p finetune-trainer --no-fail-fast

test-e2e: ## The end-to-end tests on the local control plane (real kube-apiserver, scheduler, etcd).
	$(CARGO) build --workspace --bins
	$(CARGO) test -p finetune-e2e --no-fail-fast

supply-chain: ## cargo deny (licenses, bans, sources); RustSec advisories when ADVISORY_DB names a snapshot.
	scripts/supply-chain.sh

lint: ## rustfmt check, clippy with warnings as errors, CRD drift check, the CUDA variant compiles.
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(MAKE) crds-check
	$(MAKE) cuda-check

cuda-build: ## Build the CUDA trainer for the GPU machines (nvcc from Debian non-free, CUDA 13 sonames).
	scripts/cuda-build.sh

cuda-check: ## Compile-check the trainer with --features nccl (CUDA and NCCL; no GPU needed).
	scripts/cuda-build.sh --check

gpu-check: ## On a GPU machine: CUDA vs CPU logits, 7B-shaped LoRA against PyTorch + PEFT, the plan's error.
	scripts/gpu-check.sh

fmt: ## Format the code.
	$(CARGO) fmt --all

crds: ## Regenerate crds/finetunejob.yaml from the Rust types (and its chart and manifest copies).
	$(CARGO) run -q -p finetune-api --bin crdgen > crds/finetunejob.yaml
	cp crds/finetunejob.yaml charts/finetune-operator/crds/finetunejob.yaml
	cp crds/finetunejob.yaml manifests/default/finetunejob-crd.yaml
	$(CARGO) run -q -p finetune-api --bin crdgen -- --without-cel > crds/finetunejob-pre-1.25.yaml

crds-check: ## Fail when crds/finetunejob.yaml (or its pre-1.25 variant) is stale.
	@$(CARGO) run -q -p finetune-api --bin crdgen | diff -u crds/finetunejob.yaml - \
		|| { echo "crds/finetunejob.yaml is stale: run 'make crds'"; exit 1; }
	@$(CARGO) run -q -p finetune-api --bin crdgen -- --without-cel \
		| diff -u crds/finetunejob-pre-1.25.yaml - \
		|| { echo "crds/finetunejob-pre-1.25.yaml is stale: run 'make crds'"; exit 1; }

assets: ## Fetch the real Llama 2 tokenizer and the labelled review data (cached).
	scripts/fetch-assets.sh

demo: ## The main job: a real end-to-end fine-tune on CPU.
	scripts/demo.sh

bench: ## Benchmarks; figures go to BENCHMARKS.md.
	scripts/bench.sh

soak: ## Long reliability runs: 1,000 jobs for 30 min (memory slope, idle writes, 409s), long fuzzing.
	scripts/soak.sh

images: ## Build the container images (needs Docker; not possible on the CI machines).
	docker build -f docker/operator.Dockerfile --target operator -t $(OPERATOR_IMAGE) .
	docker build -f docker/operator.Dockerfile --target fetch -t $(FETCH_IMAGE) .
	docker build -f docker/trainer.Dockerfile -t $(TRAINER_IMAGE) .
	docker build -f docker/trainer-cuda.Dockerfile -t $(TRAINER_CUDA_IMAGE) .

clean: ## Remove build outputs (the cache under CACHE_DIR is kept).
	$(CARGO) clean
