# syntax=docker/dockerfile:1
# The CPU trainer:
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/finetune-operator/trainer:0.1.0 .
# It carries the pretrained tiny base model (/opt/finetune/tiny-base), llama2.c's stories15M in
# Hugging Face layout (/opt/finetune/stories-15m) and the Llama 2 tokenizer
# (/opt/finetune/tokenizer/tokenizer.json) used by `model.preset: tiny` and `stories-15m`; the
# assets come from scripts/fetch-assets.sh (needs network during the build).
ARG RUST_VERSION=1.95.0
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p finetune-trainer --bin finetune-trainer \
 && install -D -m 0755 target/release/finetune-trainer /out/finetune-trainer
RUN assets="$(scripts/fetch-assets.sh)" \
 && install -D -m 0644 "$assets/tokenizer.json" /out/tokenizer/tokenizer.json \
 && /out/finetune-trainer init-tiny --out /out/tiny-base --tokenizer "$assets/tokenizer.json" \
      --pretrain-text "$assets/nyt_general.txt" \
 && /out/finetune-trainer import-llama2c --checkpoint "$assets/stories15M.bin" \
      --tokenizer "$assets/tokenizer.json" --out /out/stories-15m

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/finetune-trainer /usr/local/bin/finetune-trainer
COPY --from=build /out/tokenizer /opt/finetune/tokenizer
COPY --from=build /out/tiny-base /opt/finetune/tiny-base
COPY --from=build /out/stories-15m /opt/finetune/stories-15m
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/finetune-trainer"]
