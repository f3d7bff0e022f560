#!/usr/bin/env bash
# Runs the whole suite, kernel tests included, as root, in a private
# network and mount namespace: no interface or mount can leak onto the
# host. Extra arguments go to go test (for example -run TestICMP -v).
set -euo pipefail
cd "$(dirname "$0")"
# -p 1: one package at a time, so the leak check of a TestMain never sees
# another package's interfaces.
exec unshare --net --mount -- go test -race -count=1 -p 1 -timeout 12m "$@" ./...
