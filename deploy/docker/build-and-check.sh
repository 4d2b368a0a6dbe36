#!/usr/bin/env bash
# Builds the CPU image (deploy/docker/Dockerfile) with podman and checks it serves: the container
# runs as uid 10001 on a read-only root filesystem with the bundle mounted read-only, as in
# deploy/k8s, and gRPC health is checked from outside through the published ports.
#
#   deploy/docker/build-and-check.sh [BUNDLE_ROOT]
#
# No container registry is needed: the Dockerfile's base, debian:bookworm-slim, is made here
# from Debian's packages (debootstrap + podman import) and tagged with that name, unless an
# image of that name is present already (a real pull gives the same image). Runs as root.
# Prints `check NAME=VALUE` lines on stdout (progress and logs go to stderr) and exits non-zero
# when a check fails.
#
# BUNDLE_ROOT  bundle to serve (default: the sample catalog built without a cross-encoder)
# PYTHON       the project's interpreter, for `pip download` of torch, `recsys build` and the
#              health checks (default .venv/bin/python)
# TORCH        torch requirement, as in the Makefile; the wheel pip picks here goes into the
#              image (default torch==2.13.0)
# IMAGE        tag to build (default localhost/recsys:check)
# SERVICE      what the container serves: all (default), retrieval, ranking or gateway
# WAIT_S       how long the services may take to report SERVING (default 300)
# CACHE_DIR    debootstrap's package cache, the torch wheel, the default bundle (default build/image)
# DEBIAN_MIRROR  where debootstrap downloads from (default http://deb.debian.org/debian)
# HOST_CA_BUNDLE  CA bundle pip trusts inside the build (default /etc/ssl/certs/ca-certificates.crt)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
TORCH=${TORCH:-torch==2.13.0}
IMAGE=${IMAGE:-localhost/recsys:check}
SERVICE=${SERVICE:-all}
WAIT_S=${WAIT_S:-300}
CACHE_DIR=$(mkdir -p "${CACHE_DIR:-$ROOT/build/image}" && cd "${CACHE_DIR:-$ROOT/build/image}" && pwd)
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_CA_BUNDLE=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# The name `FROM debian:bookworm-slim` resolves to, as a pull would store it.
BASE=docker.io/library/debian:bookworm-slim
SUITE=bookworm
# The image's gRPC ports (Dockerfile EXPOSE).
declare -A GRPC_PORT=([gateway]=50051 [retrieval]=50052 [ranking]=50053)

log() { echo "[$(date +%T)] $*" >&2; }

# What podman needs on these machines (VMs where root lacks CAP_SYS_RESOURCE, cgroups are in
# hybrid v1 + v2 mode and PID 1 is no systemd; podman itself picks cgroupfs and file events):
# - runc: crun, Debian's default runtime, refuses hybrid cgroups ("cgroups in hybrid mode not
#   supported, drop all controllers from cgroupv2");
# - explicit limits for open files and processes: podman's default of 1048576 is above the hard
#   limits here, which root cannot raise (setrlimit: operation not permitted). Podman runs with
#   at most 32768 processes itself, and a container cannot get more than its runtime has.
podman() { command podman --runtime=runc "$@"; }
NOFILE=$(ulimit -Hn)
NPROC=$(ulimit -Hu)
[[ $NPROC == unlimited || $NPROC -gt 32768 ]] && NPROC=32768
[[ $NOFILE == unlimited ]] && NOFILE=1048576
LIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")

# ---- the base image: debian:bookworm-slim from Debian's packages -----------------------------

# What debuerreotype, which makes the official image, adds to a minbase debootstrap ("slim":
# no documentation, man pages or translations; apt keeps no caches).
slim_config() {
  local rootfs=$1
  mkdir -p "$rootfs/etc/dpkg/dpkg.cfg.d" "$rootfs/etc/apt/apt.conf.d"
  cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
  echo 'force-unsafe-io' > "$rootfs/etc/dpkg/dpkg.cfg.d/docker-apt-speedup"
  printf '%s\n' 'Dir::Cache::pkgcache "";' 'Dir::Cache::srcpkgcache "";' \
    > "$rootfs/etc/apt/apt.conf.d/docker-clean"
  echo 'Acquire::GzipIndexes "true";' > "$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
  echo 'Acquire::Languages "none";' > "$rootfs/etc/apt/apt.conf.d/docker-no-languages"
  echo 'Apt::AutoRemove::SuggestsImportant "false";' \
    > "$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
  # The official image's sources: the release, its updates and security updates.
  rm -f "$rootfs/etc/apt/sources.list"
  cat > "$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # Files the excludes would have kept out, and what debootstrap leaves behind.
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/{groff,info,linda,locale,man}/* "$rootfs"/usr/share/lintian/overrides/*
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  rm -rf "$rootfs"/var/log/{bootstrap.log,alternatives.log,dpkg.log,apt/*} "$rootfs"/tmp/* "$rootfs"/root/.cache
  : > "$rootfs/etc/machine-id" 2>/dev/null || true
}

make_base() {
  if podman image exists "$BASE"; then
    log "base: $BASE present, reused"
    return
  fi
  local rootfs
  rootfs=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
  mkdir -p "$CACHE_DIR/debs"
  log "base: debootstrap --variant=minbase $SUITE from $DEBIAN_MIRROR"
  # --cache-dir keeps the .debs for the next run; minbase: Essential + apt, as the official image.
  debootstrap --variant=minbase --cache-dir="$CACHE_DIR/debs" "$SUITE" "$rootfs" "$DEBIAN_MIRROR" \
    > "$CACHE_DIR/debootstrap.log" 2>&1 || {
    tail -n 40 "$CACHE_DIR/debootstrap.log" >&2
    return 1
  }
  slim_config "$rootfs"
  tar --numeric-owner --xattrs -C "$rootfs" -c . | podman import --change 'CMD ["bash"]' - "$BASE" >&2
  rm -rf "$rootfs"
}

# ---- the image ------------------------------------------------------------------------------

# What the build reads from this machine, mounted read-only at /inputs: the torch wheel that
# `make setup` installs here (pip's configuration picks it: a CPU build, where PyPI's own Linux
# wheel is a CUDA one) and the CA bundle this machine trusts (HTTPS may go through an
# intercepting proxy whose CA Debian's bundle lacks).
build_inputs() {
  local dir=$CACHE_DIR/inputs
  mkdir -p "$dir"
  if [[ ! -f $dir/torch.spec || $(cat "$dir/torch.spec") != "$TORCH" ]]; then
    rm -f "$dir"/torch-*.whl
    "$PYTHON" -m pip download --quiet --no-deps --dest "$dir" "$TORCH" >&2
    echo "$TORCH" > "$dir/torch.spec"
  fi
  cp "$HOST_CA_BUNDLE" "$dir/ca.crt"
  echo "$dir"
}

build_image() {
  local inputs wheel
  inputs=$(build_inputs)
  wheel=$(cd "$inputs" && compgen -G "torch-*.whl" | head -n 1)
  log "image: building $IMAGE with $wheel"
  # --pull=never: the base is local, no registry is asked.
  podman build --pull=never "${LIMITS[@]}" \
    --volume "$inputs:/inputs:ro" \
    --build-arg PIP_CERT=/inputs/ca.crt \
    --build-arg TORCH_SPEC="/inputs/$wheel" \
    --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
    --file "$ROOT/deploy/docker/Dockerfile" --tag "$IMAGE" "$ROOT" >&2
}

# ---- the check ------------------------------------------------------------------------------

default_bundle() {
  local bundle=$CACHE_DIR/sample-bundle
  if [[ ! -f $bundle/CURRENT ]]; then
    log "bundle: building the sample catalog without a cross-encoder"
    "$PYTHON" -m recsys build --no-ranker --out "$bundle" \
      --catalog "$ROOT/recsys/app/sample_data/catalog.csv" \
      --interactions "$ROOT/recsys/app/sample_data/interactions.csv" >&2
  fi
  echo "$bundle"
}

# The health status of the server at ADDRESS, checked from this machine as a probe would.
health_of() {
  "$PYTHON" - "$1" <<'EOF'
import sys
import grpc
from recsys.rpc.launcher import SERVING, check_health

try:
    code = check_health(sys.argv[1])
    print("SERVING" if code == SERVING else f"status {code}")
except grpc.RpcError as exc:
    print(exc.code().name)
EOF
}

# Prints `check health NAME=STATUS` once NAME answers SERVING, its container has stopped or
# WAIT_S have passed.
wait_serving() {
  local name=$1 address=$2 container=$3 deadline=$((SECONDS + WAIT_S)) status
  while true; do
    status=$(health_of "$address")
    [[ $status == SERVING || $SECONDS -ge $deadline ]] && break
    [[ $(podman inspect --format '{{.State.Running}}' "$container") == true ]] || break
    sleep 1
  done
  echo "check health $name=$status"
}

# Runs the image as deploy/k8s does and prints the checks: non-root, read-only root filesystem,
# writable /tmp and /cache (emptyDir there), the bundle read-only, a volume for the journal.
run_checks() {
  local bundle=$1 services=$2 state name publish=() targets="" port
  state=$(mktemp -d)
  chown 10001:10001 "$state"  # retrieval's journal, written by the container's user
  name=recsys-check-$$
  for service in $services; do
    port=$("$PYTHON" -c 'from recsys.rpc.launcher import free_port; print(free_port())')
    publish+=(--publish "127.0.0.1:$port:${GRPC_PORT[$service]}")
    targets+=" $service=127.0.0.1:$port"
  done
  # shellcheck disable=SC2064  # expanded now: the trap runs after these locals are gone
  trap "podman rm --force $name > /dev/null 2>&1 || true; rm -rf $state" EXIT
  podman run --detach --name "$name" "${LIMITS[@]}" \
    --read-only --user 10001:10001 \
    --tmpfs /tmp:rw,mode=1777 --tmpfs /cache:rw,mode=1777 \
    --volume "$bundle:/bundle:ro" --volume "$state:/state:rw" \
    --env RECSYS_BUNDLE=/bundle --env RECSYS_STATE_DIR=/state --env RECSYS_GRACE_PERIOD_S=1 \
    "${publish[@]}" "$IMAGE" serve "$SERVICE" > /dev/null

  for target in $targets; do
    wait_serving "${target%%=*}" "${target#*=}" "$name"
  done
  echo "check uid=$(podman exec "$name" id -u)"
  echo "check process_uid=$(podman exec "$name" stat -c %u /proc/1)"
  # Even root cannot write to the root filesystem; /tmp stays writable.
  case $(podman exec --user 0 "$name" touch /probe 2>&1 && echo written) in
    *"Read-only file system"*) echo "check rootfs=read-only" ;;
    written) echo "check rootfs=writable" ;;
    *) echo "check rootfs=unknown" ;;
  esac
  echo "check tmp=$(podman exec "$name" sh -c 'touch /tmp/probe && echo writable || echo read-only')"
  log "container log (tail):"
  podman logs --tail 30 "$name" >&2 || true
  # SIGTERM reaches recsys as PID 1: it drains and exits 0.
  podman stop --time 30 "$name" > /dev/null
  echo "check exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$name")"
}

main() {
  local start bundle services failed=0
  for tool in podman debootstrap; do
    command -v "$tool" > /dev/null || { echo "$tool not found (apt-get install $tool)" >&2; exit 2; }
  done
  services=$([[ $SERVICE == all ]] && echo "retrieval ranking gateway" || echo "$SERVICE")
  start=$SECONDS
  bundle=$(cd "${1:-$(default_bundle)}" && pwd)
  make_base
  log "base ready after $((SECONDS - start)) s"
  build_image
  log "image ready after $((SECONDS - start)) s"
  run_checks "$bundle" "$services" | tee "$CACHE_DIR/checks.txt"
  log "checked after $((SECONDS - start)) s"
  local expected=("check uid=10001" "check process_uid=10001" "check rootfs=read-only"
    "check tmp=writable" "check exit_code=0")
  for service in $services; do expected+=("check health $service=SERVING"); done
  for line in "${expected[@]}"; do
    grep -qxF "$line" "$CACHE_DIR/checks.txt" || { log "FAILED: no '$line'"; failed=1; }
  done
  return "$failed"
}

main "$@"
