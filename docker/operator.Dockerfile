# syntax=docker/dockerfile:1
# The operator and the download step, from one build:
#   docker build -f docker/operator.Dockerfile --target operator -t ghcr.io/finetune-operator/operator:0.1.0 .
#   docker build -f docker/operator.Dockerfile --target fetch    -t ghcr.io/finetune-operator/fetch:0.1.0 .
# (`make images` runs these.) Final images are distroless, non-root (65532), no shell.
ARG RUST_VERSION=1.95.0
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p finetune-operator --bins \
 && install -D -m 0755 target/release/finetune-operator /out/finetune-operator \
 && install -D -m 0755 target/release/finetune-fetch /out/finetune-fetch

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /out/finetune-operator /usr/local/bin/finetune-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/finetune-operator"]

FROM gcr.io/distroless/cc-debian12:nonroot AS fetch
COPY --from=build /out/finetune-fetch /usr/local/bin/finetune-fetch
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/finetune-fetch"]
