#!/usr/bin/env bash
# Build factoryfed's images: factoryfed-factory (a factory's SuperNode) and factoryfed-operator
# (SuperLink, MLflow server, data tools), with podman (or docker), from the repository root.
#
#   docker/build-images.sh            # or: make images
#
# Base image: BASE_IMAGE if set; else the public python:3.11-slim-bookworm when a registry
# answers; else a Debian bookworm base made here with debootstrap from Debian's mirror
# (localhost/debian:bookworm, made once and reused). Python packages come from the normal
# package index, pinned by constraints.txt; torch is the CPU wheel of the pinned release, taken
# from a local wheel folder (TORCH_WHEEL_DIR, default $PIP_FIND_LINKS) copied into
# docker/.build/wheels, or from TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu).
#
# Environment:
#   ENGINE           podman or docker (default: podman if installed)
#   BASE_IMAGE       base image for both images (skips the registry probe and debootstrap)
#   TORCH_WHEEL_DIR  folder holding torch-<pinned>+cpu-*.whl (default: $PIP_FIND_LINKS)
#   TORCH_INDEX_URL  an extra index that serves the CPU torch wheel (when no wheel folder)
#   PIP_CERT         a CA bundle pip must trust (a proxy's); used during the build only
#   IMAGE_TAG        tag of the built images (default latest)
#   IMAGES           which to build (default "factory operator")
#   DEBIAN_MIRROR    mirror for debootstrap (default http://deb.debian.org/debian)
# Podman on hosts with hybrid cgroups or low rlimits needs the runtime and limits below:
#   PODMAN_RUNTIME   (default runc when installed)  ULIMITS (default nofile/nproc 1024)
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE="${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}"
IMAGE_TAG="${IMAGE_TAG:-latest}"
IMAGES="${IMAGES:-factory operator}"
PUBLIC_BASE="docker.io/library/python:3.11-slim-bookworm"
LOCAL_BASE="localhost/debian:bookworm"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BUILD_DIR="docker/.build"   # git- and build-ignored except for what the Dockerfiles mount
TORCH_VERSION="$(sed -n 's/^torch==//p' constraints.txt)"

say() { echo "[build-images] $*" >&2; }
die() { say "$*"; exit 1; }

engine_opts=()
if [ "$(basename "$ENGINE")" = podman ]; then
  runtime="${PODMAN_RUNTIME:-$(command -v runc >/dev/null && echo runc || true)}"
  [ -n "$runtime" ] && engine_opts+=(--runtime "$runtime")
  read -r -a ulimits <<< "${ULIMITS:---ulimit nofile=1024:1024 --ulimit nproc=1024:1024}"
  engine_opts+=("${ulimits[@]}" --format docker)   # docker format keeps HEALTHCHECK
fi

image_exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

make_local_base() {
  # A minimal Debian bookworm root file system from Debian's mirror, imported as an image.
  command -v debootstrap >/dev/null || die "no registry reachable and no debootstrap: apt-get install -y debootstrap"
  # Removed explicitly on every exit path: a RETURN trap would stay set after this function
  # and fire again, with $rootfs out of scope (an unbound variable under set -u), when the
  # caller returns.
  local rootfs
  rootfs="$(mktemp -d "${TMPDIR:-/tmp}/factoryfed-rootfs.XXXXXX")"
  say "making $LOCAL_BASE with debootstrap from $DEBIAN_MIRROR"
  if ! debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >"$rootfs.log" 2>&1; then
    tail -20 "$rootfs.log" >&2
    rm -rf "$rootfs" "$rootfs.log"
    die "debootstrap failed"
  fi
  rm -f "$rootfs.log"
  if ! tar -C "$rootfs" -c . | "$ENGINE" import - "$LOCAL_BASE" >/dev/null; then
    rm -rf "$rootfs"
    die "importing the debootstrap root file system as $LOCAL_BASE failed"
  fi
  rm -rf "$rootfs"
}

choose_base() {
  if [ -n "${BASE_IMAGE:-}" ]; then echo "$BASE_IMAGE"; return; fi
  if image_exists "$PUBLIC_BASE"; then echo "$PUBLIC_BASE"; return; fi
  if image_exists "$LOCAL_BASE"; then echo "$LOCAL_BASE"; return; fi
  if timeout 60 "$ENGINE" pull -q "$PUBLIC_BASE" >/dev/null 2>&1; then echo "$PUBLIC_BASE"; return; fi
  say "no registry answered for $PUBLIC_BASE"
  make_local_base
  echo "$LOCAL_BASE"
}

prepare_context() {
  # Only docker/.build/wheels (the torch wheel) and docker/.build/ca (a proxy's CA bundle)
  # are mounted into the pip step; neither ends up in an image layer.
  rm -rf "$BUILD_DIR"
  mkdir -p "$BUILD_DIR/wheels" "$BUILD_DIR/ca"
  local dir="${TORCH_WHEEL_DIR:-${PIP_FIND_LINKS:-}}" found=""
  if [ -n "$dir" ]; then
    for wheel in "$dir"/torch-"$TORCH_VERSION"+cpu-cp311-*.whl; do
      [ -f "$wheel" ] && cp "$wheel" "$BUILD_DIR/wheels/" && found="$wheel"
    done
  fi
  if [ -n "$found" ]; then
    say "torch: $(basename "$found")"
  elif [ -z "${TORCH_INDEX_URL:-}" ]; then
    die "no torch-$TORCH_VERSION+cpu wheel for Python 3.11 in '${dir:-<unset>}': set TORCH_WHEEL_DIR to a folder holding it, or TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
  fi
  if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then cp "$PIP_CERT" "$BUILD_DIR/ca/ca-bundle.crt"; fi
}

base="$(choose_base)"
prepare_context
say "engine $ENGINE, base $base"
for name in $IMAGES; do
  start=$(date +%s)
  ignore_opts=()   # Docker (BuildKit) reads <Dockerfile>.dockerignore by itself
  [ "$(basename "$ENGINE")" = podman ] && ignore_opts=(--ignorefile "docker/$name.Dockerfile.dockerignore")
  "$ENGINE" build "${engine_opts[@]}" \
    -f "docker/$name.Dockerfile" "${ignore_opts[@]}" \
    --build-arg BASE_IMAGE="$base" --build-arg TORCH_INDEX_URL="${TORCH_INDEX_URL:-}" \
    -t "localhost/factoryfed-$name:$IMAGE_TAG" .
  size=$("$ENGINE" image inspect --format "{{.Size}}" "localhost/factoryfed-$name:$IMAGE_TAG")
  say "localhost/factoryfed-$name:$IMAGE_TAG built in $(( $(date +%s) - start )) s, $(( size / 1000000 )) MB"
done
rm -rf "$BUILD_DIR"
