#!/usr/bin/env bash
# Start a one-machine Ray cluster (head node) for dsum jobs, with token authentication on, and print how
# to send jobs to it. Stop it with `ray stop`.
#   ray_cluster/start-local-head.sh [NUM_CPUS]
set -euo pipefail
export RAY_AUTH_MODE=token
ray get-auth-token >/dev/null 2>&1 || ray get-auth-token --generate >/dev/null   # ~/.ray/auth_token
ray start --head --node-ip-address=127.0.0.1 --port="${RAY_PORT:-6379}" \
  --dashboard-host=127.0.0.1 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" \
  ${1:+--num-cpus="$1"} --disable-usage-stats
cat <<MSG

Ray head on 127.0.0.1 (token in ~/.ray/auth_token). With RAY_AUTH_MODE=token set in your shell:
  dsum train jobs/tiny-dialogsum.yaml --address 127.0.0.1:${RAY_PORT:-6379}
  ray job submit --address http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265} --working-dir . \\
    --runtime-env ray_cluster/runtime_env.yaml -- python -m dsum.cli train jobs/tiny-dialogsum.yaml
MSG
