#!/usr/bin/env bash
# A Ray cluster for temu_dist.tune searches across machines. On the head node:
#   bash launch/ray-cluster.sh head        # RAY_HEAD_IP=ADDR: the address to offer, on a host of several networks
# on every worker node (HEAD_IP: the head's address):
#   bash launch/ray-cluster.sh worker HEAD_IP
# then, on the head, run the search against it (trials see the same paths: put shards and runs on a shared disk):
#   RAY_AUTH_MODE=token RAY_ADDRESS=auto python -m temu_dist.tune --config configs/tune/prompt-layers.yaml
# and `ray stop` on every node when done. Under SLURM, launch/ray-slurm.sbatch does all of this in one job.
# Token authentication: the head makes a token (~/.ray/auth_token) unless one is there; every node and the search's
# driver need RAY_AUTH_MODE=token and that token, which a shared home gives them, else RAY_AUTH_TOKEN=TOKEN (printed by
# `ray get-auth-token` on the head). Ray 2.60 turns tokens on at a head that finds one but not at a joining node, so
# without this a worker is refused (InvalidAuthToken).
set -euo pipefail
source "$(dirname "$0")/../.venv/bin/activate"
export RAY_AUTH_MODE=token
case "${1:-}" in
  head)
    ray get-auth-token --generate >/dev/null
    ray start --head --port "${RAY_PORT:-6379}" ${RAY_HEAD_IP:+--node-ip-address="$RAY_HEAD_IP"} \
      --include-dashboard=false ;;
  worker) ray start --address "${2:?usage: ray-cluster.sh worker HEAD_IP}:${RAY_PORT:-6379}" ;;
  *) echo "usage: ray-cluster.sh head | worker HEAD_IP" >&2; exit 2 ;;
esac
