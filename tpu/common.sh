#!/usr/bin/env bash
# Shared by the tpu/*.sh scripts (sourced, not run): settings, presets, argument parsing and
# `run`, which prints every command ("+ ...") and runs it unless --dry-run was given.
#
# Settings come from flags, else from the environment (TPU_NAME, TPU_ZONE, TPU_PROJECT,
# TPU_PRESET, TPU_SLICES), else from the preset:
#
#   preset  accelerator  runtime version        zone        hosts  chips
#   v5e-8   v5litepod-8  v2-alpha-tpuv5-lite    us-west4-a  1      8
#   v5p-64  v5p-64       v2-alpha-tpuv5         us-east5-a  8      32

# shellcheck disable=SC2034  # the variables are read by the scripts that source this file

NAME="${TPU_NAME:-fedrag-jax}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
PRESET="${TPU_PRESET:-v5e-8}"
SLICES="${TPU_SLICES:-1}"
ACCELERATOR=""
RUNTIME_VERSION=""
DRY_RUN=0
REMOTE_DIR="fedrag-jax"  # on every worker, relative to the home directory
SHIFT_BY=1

COMMON_USAGE="common options:
  --name NAME              TPU (or queued resource) name        [\$TPU_NAME, fedrag-jax]
  --zone ZONE              zone                                 [\$TPU_ZONE, the preset's]
  --project PROJECT        Google Cloud project                 [\$TPU_PROJECT, gcloud's]
  --preset v5e-8|v5p-64    accelerator, runtime and zone        [\$TPU_PRESET, v5e-8]
  --accelerator-type TYPE  override the preset's accelerator type (e.g. v5litepod-16)
  --version VERSION        override the preset's TPU runtime version
  --slices N               number of slices (queued resources, nodes NAME-0 .. NAME-N-1)
  --dry-run                print the commands, run nothing
  -h, --help               this help"

die() {
  echo "error: $*" >&2
  exit 2
}

# Print a command as a copy-pasteable shell line.
show() {
  printf '+ %s\n' "$(quote_all "$@")"
}

run() {
  show "$@"
  if ((DRY_RUN == 0)); then
    "$@"
  fi
}

# Split "--flag=value" into "--flag" "value"; the result is in the ARGS array.
split_args() {
  ARGS=()
  local arg
  for arg in "$@"; do
    if [[ "$arg" == --*=* ]]; then
      ARGS+=("${arg%%=*}" "${arg#*=}")
    else
      ARGS+=("$arg")
    fi
  done
}

need_value() {
  [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"
}

# Handle one common option at "$@"; sets SHIFT_BY to the number of words it used.
common_option() {
  SHIFT_BY=2
  case "$1" in
    --name) need_value "$@"; NAME="$2" ;;
    --zone) need_value "$@"; ZONE="$2" ;;
    --project) need_value "$@"; PROJECT="$2" ;;
    --preset) need_value "$@"; PRESET="$2" ;;
    --accelerator-type) need_value "$@"; ACCELERATOR="$2" ;;
    --version) need_value "$@"; RUNTIME_VERSION="$2" ;;
    --slices) need_value "$@"; SLICES="$2" ;;
    --dry-run) DRY_RUN=1; SHIFT_BY=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
}

# Fill in what the preset implies and check the settings; call after parsing.
finish_settings() {
  local zone accelerator version config hosts
  case "$PRESET" in
    v5e-8) accelerator=v5litepod-8 version=v2-alpha-tpuv5-lite zone=us-west4-a hosts=1
           config=configs/tpu-v5e-8.yaml ;;
    v5p-64) accelerator=v5p-64 version=v2-alpha-tpuv5 zone=us-east5-a hosts=8
            config=configs/tpu-v5p-64.yaml ;;
    *) die "unknown preset $PRESET; use v5e-8 or v5p-64 (and --accelerator-type to vary)" ;;
  esac
  ACCELERATOR="${ACCELERATOR:-$accelerator}"
  RUNTIME_VERSION="${RUNTIME_VERSION:-$version}"
  ZONE="${ZONE:-$zone}"
  PRESET_CONFIG="$config"
  PRESET_HOSTS="$hosts"
  [[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer, got $SLICES"
  [[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name must be lower case letters, digits and dashes, got $NAME"
  GCLOUD_FLAGS=("--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then
    GCLOUD_FLAGS+=("--project=$PROJECT")
  fi
  NODES=()
  if ((SLICES == 1)); then
    NODES=("$NAME")
  else
    local i
    for ((i = 0; i < SLICES; i++)); do
      NODES+=("$NAME-$i")
    done
  fi
}

# ssh NODE WORKER COMMAND: run COMMAND on WORKER ("all", or a number) of TPU VM NODE.
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$1" "${GCLOUD_FLAGS[@]}" --worker="$2" --command="$3"
}

# The fedrag-jax command line every worker runs (as a module: pip's console scripts may not be
# on the PATH of a non-interactive ssh shell). The scripts add distributed=true, with which
# the CLI calls jax.distributed.initialize() (on TPU it finds the other hosts by itself)
# before anything touches the devices.
LAUNCH='python3 -m fedrag_jax.cli'

# A word quoted for a bash command line: as is when safe, "..." when nothing in it is special
# inside double quotes, '...' otherwise; "--flag=value" keeps the flag outside the quotes.
SAFE='^[A-Za-z0-9_./:=@,+%^~-]+$'  # ~ stays unquoted so that it expands to the home directory
quote() {
  if [[ "$1" =~ $SAFE ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ ^(--[a-z-]+=)(.*)$ ]]; then
    printf '%s%s' "${BASH_REMATCH[1]}" "$(quote "${BASH_REMATCH[2]}")"
  elif [[ "$1" != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local word out=""
  for word in "$@"; do
    out+=" $(quote "$word")"
  done
  printf '%s' "${out# }"
}
