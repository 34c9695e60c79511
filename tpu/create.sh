#!/usr/bin/env bash
# Create a Cloud TPU VM (v5e-8) or pod slice (v5p-64) for fedrag-jax.
#
#   tpu/create.sh --preset v5e-8 --zone us-west4-a --dry-run     # print, run nothing
#   tpu/create.sh --preset v5p-64 --queued --spot --wait         # queued resource, wait
#   tpu/create.sh --preset v5e-8 --slices 2                      # two slices, for federate.sh
#
# Without --queued (and with one slice) this is `gcloud compute tpus tpu-vm create`, which
# fails at once when there is no capacity; --queued (implied by --slices > 1) asks the TPU
# queue instead (`gcloud compute tpus queued-resources create`) and --wait polls until ACTIVE.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
SPOT=0
WAIT=0

usage() {
  cat <<EOF
usage: tpu/create.sh [options]

  --queued                 use a queued resource (recommended for pods; implied by --slices > 1)
  --spot                   Spot capacity (cheaper, may be preempted)
  --wait                   with --queued: poll until the queued resource is ACTIVE

$COMMON_USAGE
EOF
}

split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --wait) WAIT=1; shift ;;
    *) common_option "$@"; shift "$SHIFT_BY" ;;
  esac
done
finish_settings
if ((SLICES > 1)); then
  QUEUED=1
fi

extra=()
if ((SPOT)); then
  extra+=(--spot)
fi

if ((QUEUED == 0)); then
  run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION" "${extra[@]+"${extra[@]}"}"
  exit 0
fi

if ((SLICES == 1)); then
  nodes=(--node-id="$NAME")
else
  nodes=(--node-count="$SLICES" --node-prefix="$NAME")
fi
run gcloud compute tpus queued-resources create "$NAME" "${GCLOUD_FLAGS[@]}" \
  --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME_VERSION" "${nodes[@]}" \
  "${extra[@]+"${extra[@]}"}"

describe=(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_FLAGS[@]}"
  --format='value(state.state)')
if ((WAIT == 0)); then
  echo "# the request is queued; check it with:"
  show "${describe[@]}"
  exit 0
fi
if ((DRY_RUN)); then
  echo "# poll every 30 s until ACTIVE:"
  show "${describe[@]}"
  exit 0
fi
while true; do
  state="$("${describe[@]}")"
  echo "queued resource $NAME: $state"
  case "$state" in
    ACTIVE) break ;;
    FAILED | SUSPENDED) die "queued resource $NAME is $state" ;;
  esac
  sleep 30
done
