#!/usr/bin/env bash
# Train on every worker of a TPU VM / pod slice: the same `fedrag-jax train ... distributed=true`
# command runs on all hosts (--worker=all), each process joins the others with
# jax.distributed.initialize() (auto-detected on Cloud TPU) and the one global mesh of the
# config spans the whole slice.
#
#   tpu/train.sh --preset v5e-8 --output gs://my-bucket/runs/lsr --dry-run
#   tpu/train.sh --preset v5p-64 --output gs://my-bucket/runs/ralt -- mode=generator ralt.steps=200
#
# Words after "--" are key=value config overrides. Checkpoints, metrics, plots and the tuned
# system go to output_dir=gs://... (every host writes its checkpoint shards, the first host
# the rest); --mount instead mounts the bucket with gcsfuse on every worker and passes the
# mounted path.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=""
OUTPUT=""
MOUNT=0
DETACH=0
OVERRIDES=()

usage() {
  cat <<EOF
usage: tpu/train.sh [options] [-- key=value ...]

  --config FILE            config on the workers, relative to ~/$REMOTE_DIR  [the preset's]
  --output gs://BUCKET/DIR output_dir for checkpoints and metrics (required: workers' disks
                           are lost with the TPU)
  --mount                  mount the bucket with gcsfuse on every worker and write there
  --detach                 run in the background (nohup); the log is ~/$REMOTE_DIR/train.log

$COMMON_USAGE
EOF
}

split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --output) need_value "$@"; OUTPUT="$2"; shift 2 ;;
    --mount) MOUNT=1; shift ;;
    --detach) DETACH=1; shift ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) common_option "$@"; shift "$SHIFT_BY" ;;
  esac
done
finish_settings
CONFIG="${CONFIG:-$PRESET_CONFIG}"
((SLICES == 1)) || die "train.sh runs one slice; for several slices use federate.sh"
[[ "$OUTPUT" =~ ^gs://[a-z0-9][a-z0-9._-]*(/[A-Za-z0-9._/-]*)?$ ]] ||
  die "--output gs://BUCKET/DIR is required (letters, digits, . _ - /; got '${OUTPUT}')"
for kv in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
  [[ "$kv" == *=* ]] || die "override '$kv' must look like key=value"
done

# the shell line each worker runs: set up, then the same training command everywhere
setup="cd ~/$REMOTE_DIR"
output_dir="output_dir=$OUTPUT"
if ((MOUNT)); then
  bucket="${OUTPUT#gs://}"
  bucket="${bucket%%/*}"
  mnt="\$HOME/gcs/$bucket"
  setup+=" && mkdir -p \"$mnt\" && (mountpoint -q \"$mnt\" || gcsfuse --implicit-dirs $bucket \"$mnt\")"
  output_dir="output_dir=\"$mnt${OUTPUT#gs://"$bucket"}\""
fi
train="$LAUNCH train --config $(quote "$CONFIG") $output_dir distributed=true"
if ((${#OVERRIDES[@]})); then
  train+=" $(quote_all "${OVERRIDES[@]}")"
fi
if ((DETACH)); then
  train="nohup $train < /dev/null > ~/$REMOTE_DIR/train.log 2>&1 &"
fi
tpu_ssh "$NAME" all "$setup && $train"
