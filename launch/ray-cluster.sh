#!/usr/bin/env bash
# A Ray cluster for temu_dist.tune searches across machines. On the head node:
#   bash launch/ray-cluster.sh head
# on every worker node (HEAD_IP: the head's address):
#   bash launch/ray-cluster.sh worker HEAD_IP
# then, on the head, run the search against it (trials see the same paths: put shards and runs on a shared disk):
#   RAY_ADDRESS=auto python -m temu_dist.tune --config configs/tune/prompt-layers.yaml
# and `ray stop` on every node when done.
set -euo pipefail
source "$(dirname "$0")/../.venv/bin/activate"
case "${1:-}" in
  head) ray start --head --port 6379 --include-dashboard=false ;;
  worker) ray start --address "${2:?usage: ray-cluster.sh worker HEAD_IP}:6379" ;;
  *) echo "usage: ray-cluster.sh head | worker HEAD_IP" >&2; exit 2 ;;
esac
