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
# CACHE_DIR    debootstrap's package cache, the torch wheel, the default bundle (default build/image)
# DEBIAN_MIRROR  where debootstrap downloads from (default http://deb.debian.org/debian)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
TORCH=${TORCH:-torch==2.13.0}
IMAGE=${IMAGE:-localhost/recsys:check}
SERVICE=${SERVICE:-all}
CACHE_DIR=$(mkdir -p "${CACHE_DIR:-$ROOT/build/image}" && cd "${CACHE_DIR:-$ROOT/build/image}" && pwd)
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The name `FROM debian:bookworm-slim` resolves to, as a pull would store it.
BASE=docker.io/library/debian:bookworm-slim
SUITE=bookworm
# The image's gRPC ports (Dockerfile EXPOSE).
declare -A GRPC_PORT=([gateway]=50051 [retrieval]=50052 [ranking]=50053)

log() { echo "[$(date +%T)] $*" >&2; }

podman() {
  # PID 1 here is no systemd, so cgroups are managed directly and events go to a file (podman's
  # defaults are systemd's cgroup manager and the journal).
  command podman --cgroup-manager=cgroupfs --events-backend=file "$@"
}

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

# The torch wheel `make setup` installs on this machine (pip's configuration decides which: a
# CPU build here), handed to the build through a read-only mount.
torch_wheel() {
  local dir=$CACHE_DIR/torch/${TORCH//[^A-Za-z0-9.=+_-]/_}
  if ! compgen -G "$dir/torch-*.whl" > /dev/null; then
    mkdir -p "$dir"
    "$PYTHON" -m pip download --quiet --no-deps --dest "$dir" "$TORCH" >&2
  fi
  compgen -G "$dir/torch-*.whl" | head -n 1
}

build_image() {
  local wheel
  wheel=$(torch_wheel)
  log "image: building $IMAGE with $(basename "$wheel")"
  # --pull=never: the base is local, no registry is asked. --network=host: see README notes in
  # the report; pip reaches PyPI through the host's network.
  podman build --pull=never --network=host \
    --volume "$(dirname "$wheel"):/wheelhouse:ro" \
    --build-arg TORCH_SPEC="/wheelhouse/$(basename "$wheel")" \
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

# Waits until every service answers health SERVING on its published port; prints the checks.
check_health() {
  local spec=$1
  "$PYTHON" - "$spec" <<'EOF'
import sys, time
import grpc
from recsys.rpc.launcher import SERVING, check_health

deadline = time.monotonic() + 300
for item in sys.argv[1].split():
    name, address = item.split("=")
    status = "UNREACHABLE"
    while time.monotonic() < deadline:
        try:
            code = check_health(address)
            status = "SERVING" if code == SERVING else str(code)
            if code == SERVING:
                break
        except grpc.RpcError:
            pass
        time.sleep(1)
    print(f"check health {name}={status}", flush=True)
EOF
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
  podman run --detach --name "$name" \
    --read-only --user 10001:10001 \
    --tmpfs /tmp:rw,mode=1777 --tmpfs /cache:rw,mode=1777 \
    --volume "$bundle:/bundle:ro" --volume "$state:/state:rw" \
    --env RECSYS_BUNDLE=/bundle --env RECSYS_STATE_DIR=/state --env RECSYS_GRACE_PERIOD_S=1 \
    "${publish[@]}" "$IMAGE" serve "$SERVICE" > /dev/null

  check_health "$targets"
  echo "check uid=$(podman exec "$name" id -u)"
  echo "check process_uid=$(podman exec "$name" stat -c %u /proc/1)"
  # Even root cannot write to the root filesystem; /tmp stays writable.
  if podman exec --user 0 "$name" touch /probe 2> /dev/null; then
    echo "check rootfs=writable"
  else
    echo "check rootfs=read-only"
  fi
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
  make_base
  log "base ready after $((SECONDS - start)) s"
  build_image
  log "image ready after $((SECONDS - start)) s"
  bundle=$(cd "${1:-$(default_bundle)}" && pwd)
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
