# syntax=docker/dockerfile:1
# The CUDA trainer with NCCL (`--features nccl`, which implies `cuda`; the CUDA images carry
# NCCL: libnccl-dev in -devel for the link, libnccl2 in -runtime):
#   docker build -f docker/trainer-cuda.Dockerfile -t ghcr.io/finetune-operator/trainer:0.1.0-cuda .
# CUDA_COMPUTE_CAP selects the kernels candle compiles (90 = H100/H200, 80 = A100).
ARG RUST_VERSION=1.95.0
ARG CUDA_VERSION=12.4.1
FROM docker.io/nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build
ARG RUST_VERSION
ARG CUDA_COMPUTE_CAP=90
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} PATH=/root/.cargo/bin:${PATH}
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
 && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}
WORKDIR /src
COPY . .
RUN cargo build --locked --release -p finetune-trainer --bin finetune-trainer --features nccl \
 && install -D -m 0755 target/release/finetune-trainer /out/finetune-trainer
# The build stage has no GPU: the tiny base is initialised with a CPU build of the trainer (its
# own target directory), never by running the CUDA binary here.
RUN cargo build --locked --release -p finetune-trainer --bin finetune-trainer --target-dir target/cpu \
 && assets="$(scripts/fetch-assets.sh)" \
 && install -D -m 0644 "$assets/tokenizer.json" /out/tokenizer/tokenizer.json \
 && target/cpu/release/finetune-trainer init-tiny --out /out/tiny-base --tokenizer "$assets/tokenizer.json" \
      --pretrain-text "$assets/nyt_general.txt" \
 && target/cpu/release/finetune-trainer import-llama2c --checkpoint "$assets/stories15M.bin" \
      --tokenizer "$assets/tokenizer.json" --out /out/stories-15m

FROM docker.io/nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04
COPY --from=build /out/finetune-trainer /usr/local/bin/finetune-trainer
COPY --from=build /out/tokenizer /opt/finetune/tokenizer
COPY --from=build /out/tiny-base /opt/finetune/tiny-base
COPY --from=build /out/stories-15m /opt/finetune/stories-15m
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/finetune-trainer"]
