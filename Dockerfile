# pgcdc and pgcdc-indexer in a small image:
#   docker build -t pgcdc .
#   docker run --rm pgcdc run --source postgres://… --kafka broker:9092
# The build and runtime stages are both Debian 12 (bookworm), so the binaries run against the
# same glibc and libssl3 they were linked with. docker-compose.yml builds this image.

FROM rust:1.95-bookworm AS build
# rdkafka compiles librdkafka from source: C/C++ compilers, make, pkg-config, OpenSSL and zlib.
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config libssl-dev zlib1g-dev make g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# Dependencies first, built against stub sources for every target Cargo.toml names, so a
# change to pgcdc's own code does not rebuild them.
COPY Cargo.toml Cargo.lock README.md ./
RUN for f in $(sed -n 's/^path = "\(src\/.*\.rs\)"$/\1/p' Cargo.toml); do \
        mkdir -p "$(dirname "$f")" && echo 'fn main() {}' > "$f"; \
    done \
 && cargo build --release --locked \
 && rm -rf src

COPY src ./src
# The copied sources may carry older timestamps than the stubs' build: make cargo see them.
RUN find src -name '*.rs' -exec touch {} + \
 && cargo build --release --locked --bins \
 && install -D -m 755 -t /out target/release/pgcdc target/release/pgcdc-indexer

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /var/lib/pgcdc pgcdc
COPY --from=build /out/ /usr/local/bin/
USER pgcdc
WORKDIR /var/lib/pgcdc
ENTRYPOINT ["pgcdc"]
CMD ["--help"]
