#!/usr/bin/env bash
# Federated fine-tuning on TPUs, two ways:
#
#   --engine spmd (default): every client on its own device slice of ONE program on one TPU
#     slice (the SPMD simulator: a `clients` mesh axis, local steps vmapped, updates averaged).
#       tpu/federate.sh --preset v5e-8 --clients 4 --output gs://my-bucket/runs/fed --dry-run
#
#   --engine flower: a real Flower deployment over several slices, one SuperNode per slice
#     (each slice's chips belong to its ClientApp) and the SuperLink on worker 0 of slice 0
#     (its ServerApp aggregates on CPU: JAX_PLATFORMS=cpu). Create the slices with
#     `tpu/create.sh --slices N` and install with `tpu/install.sh --slices N` first.
#       tpu/federate.sh --engine flower --slices 2 --output gs://my-bucket/runs/fed --dry-run
#       tpu/federate.sh --engine flower --slices 2 --stop        # stop SuperLink and SuperNodes
#
# Words after "--" are key=value config overrides (spmd) or Flower run-config pairs (flower).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ENGINE=spmd
CONFIG=""
OUTPUT=""
CLIENTS=""
ROUNDS=""
# shellcheck disable=SC2088  # the tilde is expanded on the workers
APP="~/$REMOTE_DIR"
STOP=0
METHOD=""
EXTRA=()
# Flower 1.42's SuperLink serves the Fleet and Control APIs on one port (as
# tests/test_deployment.py runs it on loopback)
LINK_PORT=9092

usage() {
  cat <<EOF
usage: tpu/federate.sh [options] [-- key=value ...]

  --engine spmd|flower     SPMD simulator on one slice, or Flower across slices  [spmd]
  --config FILE            config on the workers, relative to ~/$REMOTE_DIR  [the preset's]
  --output gs://BUCKET/DIR where the run writes its checkpoints and results (required)
  --clients N              spmd: number of simulated clients (fed.num_clients)  [4]
  --rounds N               federated rounds (fed.rounds)
  --app DIR                flower: the Flower App folder on worker 0 of slice 0  [~/$REMOTE_DIR]
  --method lsr|ralt|both   flower: what the run trains (both: LSR, then RALT)  [from the config's mode]
  --stop                   flower: stop the SuperLink and SuperNodes

$COMMON_USAGE
EOF
}

split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --engine) need_value "$@"; ENGINE="$2"; shift 2 ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --output) need_value "$@"; OUTPUT="$2"; shift 2 ;;
    --clients) need_value "$@"; CLIENTS="$2"; shift 2 ;;
    --rounds) need_value "$@"; ROUNDS="$2"; shift 2 ;;
    --app) need_value "$@"; APP="$2"; shift 2 ;;
    --method) need_value "$@"; METHOD="$2"; shift 2 ;;
    --stop) STOP=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) common_option "$@"; shift "$SHIFT_BY" ;;
  esac
done
finish_settings
CONFIG="${CONFIG:-$PRESET_CONFIG}"
for n in "$CLIENTS" "$ROUNDS"; do
  [[ -z "$n" || "$n" =~ ^[1-9][0-9]*$ ]] || die "--clients and --rounds take positive integers"
done
for kv in "${EXTRA[@]+"${EXTRA[@]}"}"; do
  [[ "$kv" == *=* ]] || die "'$kv' must look like key=value"
done
check_output() {
  [[ "$OUTPUT" =~ ^gs://[a-z0-9][a-z0-9._-]*(/[A-Za-z0-9._/-]*)?$ ]] ||
    die "--output gs://BUCKET/DIR is required (letters, digits, . _ - /; got '${OUTPUT}')"
}

# --- SPMD simulator: one program on every worker of one slice --------------------------------
if [[ "$ENGINE" == spmd ]]; then
  ((SLICES == 1)) || die "the SPMD simulator runs on one slice; use --engine flower for several"
  check_output
  args=(federate --config "$CONFIG" fed.engine=spmd "fed.num_clients=${CLIENTS:-4}"
    "output_dir=$OUTPUT" distributed=true)
  if [[ -n "$ROUNDS" ]]; then
    args+=("fed.rounds=$ROUNDS")
  fi
  args+=("${EXTRA[@]+"${EXTRA[@]}"}")
  tpu_ssh "$NAME" all "cd ~/$REMOTE_DIR && $LAUNCH $(quote_all "${args[@]}")"
  exit 0
fi
[[ "$ENGINE" == flower ]] || die "--engine must be spmd or flower, got $ENGINE"

# --- Flower: SuperLink on slice 0, one SuperNode per slice ------------------------------------
((SLICES >= 2)) || die "a Flower federation needs --slices 2 or more (one SuperNode each)"
((PRESET_HOSTS == 1)) ||
  die "Flower runs one ClientApp process per SuperNode: use single-host slices (e.g. v5e-8)"
[[ -z "$CLIENTS" || "$CLIENTS" == "$SLICES" ]] ||
  die "with --engine flower there is one client per slice (--clients $SLICES)"
head_node="${NODES[0]}"
# shellcheck disable=SC2088  # the tilde is expanded on the workers
dir="~/$REMOTE_DIR"

if ((STOP)); then
  for node in "${NODES[@]}"; do
    tpu_ssh "$node" 0 "cd $dir && if [ -f supernode.pid ]; then kill \$(cat supernode.pid) && rm supernode.pid; fi"
  done
  tpu_ssh "$head_node" 0 "cd $dir && if [ -f superlink.pid ]; then kill \$(cat superlink.pid) && rm superlink.pid; fi"
  exit 0
fi
check_output

# the SuperLink's internal address, which every SuperNode dials
describe=(gcloud compute tpus tpu-vm describe "$head_node" "${GCLOUD_FLAGS[@]}"
  --format='value(networkEndpoints[0].ipAddress)')
if ((DRY_RUN)); then
  show "${describe[@]}"
  echo "# SUPERLINK_IP below: the address the command above prints"
  superlink_ip=SUPERLINK_IP
else
  superlink_ip="$("${describe[@]}")"
  [[ -n "$superlink_ip" ]] || die "no internal IP for $head_node"
  echo "SuperLink address: $superlink_ip"
fi

# started in the background, the process id kept in a file for --stop
# --disable-runtime-dependency-installation: the app's dependencies are installed already
tpu_ssh "$head_node" 0 "cd $dir || exit 1; JAX_PLATFORMS=cpu nohup flower-superlink --insecure \
--host 0.0.0.0 --port $LINK_PORT --disable-runtime-dependency-installation \
< /dev/null > superlink.log 2>&1 & echo \$! > superlink.pid"

for i in "${!NODES[@]}"; do
  tpu_ssh "${NODES[$i]}" 0 "cd $dir || exit 1; nohup flower-supernode --insecure \
--superlink=$superlink_ip:$LINK_PORT \
--node-config=\"partition-id=$i\" \
< /dev/null > supernode.log 2>&1 & echo \$! > supernode.pid"
done

# the app's run config (fedrag_jax/federated/app.py): the config file, fedrag-jax overrides
# as one space-separated string, and the method
overrides="output_dir=$OUTPUT fed.num_clients=$SLICES"
if [[ -n "$ROUNDS" ]]; then
  overrides+=" fed.rounds=$ROUNDS"
fi
for kv in "${EXTRA[@]+"${EXTRA[@]}"}"; do
  [[ "$kv" != *[[:space:]\"\']* ]] || die "with --engine flower, '$kv' may not hold spaces or quotes"
  overrides+=" $kv"
done
[[ -z "$METHOD" || "$METHOD" == lsr || "$METHOD" == ralt || "$METHOD" == both ]] \
  || die "--method must be lsr, ralt or both"
run_config="config-path=\\\"$CONFIG\\\" overrides=\\\"$overrides\\\" method=\\\"$METHOD\\\""
# a named connection "tpu" to the local SuperLink, for `flwr run`
connection="[superlink.tpu]\\naddress = \\\"127.0.0.1:$LINK_PORT\\\"\\ninsecure = true\\n"
tpu_ssh "$head_node" 0 "mkdir -p ~/.flwr && printf \"$connection\" > ~/.flwr/config.toml && \
cd $dir && flwr run $APP tpu --stream --run-config \"$run_config\""
