#!/usr/bin/env bash
# The seed's whole job: start both services, index a folder, search it in words, draw the grid.
#   scripts/demo.sh [MODEL] [FOLDER] [QUERY]
# MODEL: a CLIP name (ViT-B/32, the default: real weights needed) or a checkpoint path.
# Ends with exit 0 and nothing left running; fails at once, with the service's own message,
# when a service cannot start. Also read: CLIPSEARCH_DEMO_DB (the Milvus Lite path),
# CLIPSEARCH_DEMO_GRID (the picture), and whatever `clipsearch up --help` lists
# (CLIPSEARCH_SEARCH_PORT, CLIPSEARCH_ENCODER_PORT, CLIPSEARCH_ENCODER_DEVICE, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-ViT-B/32}
FOLDER=${2:-../shared/data/imagenet-sample}
QUERY=${3:-a white dog}
DB=${CLIPSEARCH_DEMO_DB:-./data/demo-$(echo "$MODEL" | tr -c 'A-Za-z0-9\n' '_').db}
GRID=${CLIPSEARCH_DEMO_GRID:-results/demo-grid.png}
PORT=${CLIPSEARCH_SEARCH_PORT:-50052}
export CLIPSEARCH_ADDRESS="127.0.0.1:$PORT"  # the client commands talk to the `up` below
[ -x .venv/bin/clipsearch ] && PATH="$PWD/.venv/bin:$PATH"
mkdir -p "$(dirname "$GRID")"

clipsearch up --model "$MODEL" --milvus "$DB" --port "$PORT" &
UP=$!
# SIGTERM, not SIGINT: a background job of a non-interactive shell ignores SIGINT.
# `up` stops both services (drained) before it exits; waiting for it leaves nothing behind.
stop_services() {
  kill -TERM "$UP" 2>/dev/null || true
  wait "$UP" 2>/dev/null || true
}
trap stop_services EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

until clipsearch health >/dev/null; do
  # `up` has already said which service failed and why.
  kill -0 "$UP" 2>/dev/null || { wait "$UP" || true; echo "demo: clipsearch up failed" >&2; exit 1; }
  sleep 0.5
done
clipsearch index "$FOLDER"
clipsearch search "$QUERY" --top-k 10 --grid "$GRID"
echo "contact sheet: $GRID"
