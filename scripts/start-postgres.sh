#!/usr/bin/env bash
# Starts this machine's Postgres cluster if it is not running (idempotent), installing
# Debian's `postgresql` package first when it is missing (apt-get), and waits until it
# accepts connections. Tests use postgres://postgres@127.0.0.1:5432/test.
set -euo pipefail
if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
  echo "start-postgres: installing Debian's postgresql package (apt-get)"
  INSTALLED=1
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
command -v pg_ctlcluster >/dev/null || { echo "start-postgres: pg_ctlcluster still missing" >&2; exit 1; }
version=$(ls /etc/postgresql | sort -V | tail -n 1)
# A fresh install: tests connect as postgres over loopback TCP without a password.
HBA="/etc/postgresql/$version/main/pg_hba.conf"
if [ -n "${INSTALLED:-}" ] && ! grep -q "meridian-tests" "$HBA"; then
  $SUDO sed -i '1i host all postgres 127.0.0.1/32 trust # meridian-tests\nhost all postgres ::1/128 trust # meridian-tests' "$HBA"
fi
pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
for _ in $(seq 1 50); do
  pg_isready -h 127.0.0.1 -p 5432 -q && break
  sleep 0.2
done
pg_isready -h 127.0.0.1 -p 5432
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test"
