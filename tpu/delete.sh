#!/usr/bin/env bash
# Delete what create.sh made: a TPU VM, or a queued resource with its nodes (--queued, or
# --slices > 1). Copy results off the workers first: their disks go with them.
#
#   tpu/delete.sh --preset v5e-8 --zone us-west4-a --dry-run
#   tpu/delete.sh --queued --yes
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
YES=0

usage() {
  cat <<EOF
usage: tpu/delete.sh [options]

  --queued                 delete the queued resource NAME and its nodes (implied by --slices > 1)
  --yes                    do not ask gcloud for confirmation (--quiet)

$COMMON_USAGE
EOF
}

split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --queued) QUEUED=1; shift ;;
    --yes) YES=1; shift ;;
    *) common_option "$@"; shift "$SHIFT_BY" ;;
  esac
done
finish_settings
if ((SLICES > 1)); then
  QUEUED=1
fi
quiet=()
if ((YES)); then
  quiet=(--quiet)
fi

if ((QUEUED)); then
  # --force deletes the nodes of the queued resource as well
  run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_FLAGS[@]}" --force \
    "${quiet[@]+"${quiet[@]}"}"
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" "${quiet[@]+"${quiet[@]}"}"
fi
