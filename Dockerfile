# syntax=docker/dockerfile:1
# Meridian's container image: builds the release binary and the web client, then runs
# them as a non-root user on a read-only root file system (the chart mounts only
# /var/lib/meridian/keys, /etc/meridian and an emptyDir /tmp).
#
#   docker build -t meridian:0.1.0 .
#
# The build steps are the ones CI runs (scripts/test.sh): `cargo build -p meridian`
# and `npm ci && npm run build` in web-client/.

# --- web client -------------------------------------------------------------------
FROM node:22-bookworm-slim AS web
WORKDIR /src/web-client
COPY web-client/package.json web-client/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY web-client/ ./
RUN npm run build

# --- binary -------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates/ crates/
COPY tests/ tests/
COPY migrations/ migrations/
RUN cargo build --locked --release -p meridian \
    && install -D -m 0755 target/release/meridian /out/meridian

# --- runtime ------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates=20230311+deb12u1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 meridian \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/meridian --shell /usr/sbin/nologin meridian \
    && install -d -o meridian -g meridian /var/lib/meridian /etc/meridian
COPY --from=build /out/meridian /usr/local/bin/meridian
COPY --from=web /src/web-client/dist /usr/share/meridian/web
COPY meridian.example.toml /etc/meridian/meridian.example.toml
USER 10001:10001
WORKDIR /var/lib/meridian
ENV MERIDIAN_WEB_ROOT=/usr/share/meridian/web \
    MERIDIAN_DATA_DIR=/var/lib/meridian
# The media address binds all interfaces, so MERIDIAN_PUBLIC_IP (or --public-ip) is
# required: the address clients reach (the chart sets it from the downward API).
# 7880/tcp HTTP (WebSocket signaling, metrics, health), 7881/udp WebTransport, 7882/udp media.
EXPOSE 7880/tcp 7881/udp 7882/udp
ENTRYPOINT ["/usr/local/bin/meridian"]
CMD ["serve", "--http-addr", "0.0.0.0:7880", "--wt-addr", "0.0.0.0:7881", "--media-addr", "0.0.0.0:7882"]
