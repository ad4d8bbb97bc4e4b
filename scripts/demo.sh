#!/usr/bin/env bash
# The seed's whole job: start both services, index a folder, search it in words, draw the grid.
#   scripts/demo.sh [MODEL] [FOLDER] [QUERY]
# MODEL: a CLIP name (ViT-B/32, the default: real weights needed) or a checkpoint path.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-ViT-B/32}
FOLDER=${2:-../shared/data/imagenet-sample}
QUERY=${3:-a white dog}
DB=${CLIPSEARCH_DEMO_DB:-./data/demo-$(echo "$MODEL" | tr -c 'A-Za-z0-9\n' '_').db}
[ -x .venv/bin/clipsearch ] && PATH="$PWD/.venv/bin:$PATH"
mkdir -p results

clipsearch up --model "$MODEL" --milvus "$DB" --port 50052 --encoder-port 50051 &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null || true' EXIT
until clipsearch health --address 127.0.0.1:50052 >/dev/null; do
  kill -0 $UP 2>/dev/null || { echo "clipsearch up failed (see its messages above)" >&2; exit 1; }
  sleep 1
done
clipsearch index "$FOLDER"
clipsearch search "$QUERY" --top-k 10 --grid results/demo-grid.png
echo "contact sheet: results/demo-grid.png"
