# syntax=docker/dockerfile:1
# The lockctl image: `lockctl operator` runs the controller (see charts/kube-lock-manager),
# `lockctl wait` is the Jobs' init-container.
#   docker build -t REGISTRY/lockctl:0.1.0 . && docker push REGISTRY/lockctl:0.1.0

# Build stage: the pinned toolchain (Cargo.toml's rust-version) and the locked dependency graph.
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin lockctl \
 && install -D -m 0755 target/release/lockctl /out/lockctl

# Runtime stage: glibc, CA certificates and a nonroot user (65532), no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/lockctl /usr/local/bin/lockctl
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/lockctl"]
