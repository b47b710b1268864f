# Container images of Parley's four processes, from one build:
#   docker build --target gateway  -t parley-gateway  .
#   docker build --target chat     -t parley-chat     .
#   docker build --target push     -t parley-push     .
#   docker build --target operator -t parley-operator .
# protoc and SQLite come from crates, so the build needs nothing but Rust.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
        -p parley-gateway -p parley-chat -p parley-push -p parley-operator \
 && mkdir -p /out \
 && cp target/release/parley-gateway target/release/parley-chat target/release/parley-push \
       target/release/parley-operator /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home parley
USER 10001

FROM runtime AS gateway
COPY --from=build /out/parley-gateway /usr/local/bin/parley-gateway
EXPOSE 7400 7401 7403 7443
ENTRYPOINT ["/usr/local/bin/parley-gateway"]

FROM runtime AS chat
COPY --from=build /out/parley-chat /usr/local/bin/parley-chat
EXPOSE 7402 7500 7501
ENTRYPOINT ["/usr/local/bin/parley-chat"]

FROM runtime AS push
COPY --from=build /out/parley-push /usr/local/bin/parley-push
EXPOSE 7601
ENTRYPOINT ["/usr/local/bin/parley-push"]

FROM runtime AS operator
COPY --from=build /out/parley-operator /usr/local/bin/parley-operator
ENTRYPOINT ["/usr/local/bin/parley-operator"]
