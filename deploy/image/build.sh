#!/usr/bin/env bash
# Builds Egret's image (the Dockerfile) on a machine with no container engine and no registry:
# Debian's buildah, with a Python base image made here by debootstrap instead of pulled.
#
#   deploy/image/build.sh            # make image
#
# 1. buildah and debootstrap, from apt-get when missing (as root).
# 2. The base: Debian bookworm minbase with python3, python3-venv and python-is-python3, made
#    once per package list (cached as a tarball under $EGRET_IMAGE_CACHE) and imported as the
#    local image localhost/egret-python-base:bookworm-<key>.
# 3. The Dockerfile built with it as PYTHON_IMAGE (vfs storage, chroot isolation: no daemon, no
#    overlay mounts, no runc/crun). pip reaches its index inside the build through the build
#    secrets `pip.conf` and `pip-ca` made from this machine's pip settings; secrets are mounted for
#    one RUN only, so the image is the same as without them.
# 4. Its size, ID and name in var/image/image.json, and a CycloneDX SBOM of its virtual
#    environment (/opt/egret) in var/image/sbom.cdx.json (cyclonedx-py, run against the image's
#    mounted root filesystem).
#
# The image checks are tests/deploy/test_image_run.py (make image-check).
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${EGRET_IMAGE:-localhost/egret:ci}
OUT=var/image
CACHE=${EGRET_IMAGE_CACHE:-/var/tmp/egret-image}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_PACKAGES=(python3 python3-venv python-is-python3)
CYCLONEDX=${CYCLONEDX:-.venv/bin/cyclonedx-py}
# vfs: plain directories, no overlay mounts, so it works wherever buildah does (every buildah
# command here and in the tests names it: one store holds one driver).
buildah() { command buildah --storage-driver vfs "$@"; }
export BUILDAH_ISOLATION=chroot

say() { printf 'image: %s\n' "$*"; }

# --- 1. tools -------------------------------------------------------------------------------
missing=()
type -P buildah >/dev/null || missing+=(buildah)  # type -P: PATH only, not the function above
type -P debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "image: ${missing[*]} missing; run as root or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  say "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- 2. the Python base ---------------------------------------------------------------------
key=$(printf '%s\n' "$SUITE" minbase "${BASE_PACKAGES[@]}" | sha256sum | cut -c1-12)
BASE=localhost/egret-python-base:$SUITE-$key
if buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  say "base $BASE (already imported)"
else
  tarball=$CACHE/base-$SUITE-$key.tar
  if [ ! -f "$tarball" ]; then
    say "debootstrap --variant=minbase $SUITE with ${BASE_PACKAGES[*]}"
    mkdir -p "$CACHE"
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    if ! debootstrap --variant=minbase --include="$(IFS=,; echo "${BASE_PACKAGES[*]}")" \
      "$SUITE" "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
      tail -n 20 "$CACHE/debootstrap.log" >&2
      exit 1
    fi
    # What a docker image of Debian leaves out too: the downloaded packages and indexes.
    rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*
    tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  say "importing $tarball as $BASE"
  container=$(buildah from scratch)
  mountpoint=$(buildah mount "$container")
  tar -C "$mountpoint" --numeric-owner -xf "$tarball"
  buildah umount "$container" >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd python3 "$container"
  buildah commit --quiet --rm "$container" "$BASE" >/dev/null
fi

# --- 3. the image ---------------------------------------------------------------------------
secrets=$(mktemp -d)
trap 'rm -rf "$secrets"' EXIT
# pip inside the build trusts what pip here trusts (this machine's CA bundle) and uses the same
# index, if one is set. Local find-links and file:// indexes are not reachable inside a build.
ca=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
[ -n "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
index=${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}
{
  echo "[global]"
  if [ -f "$ca" ]; then echo "cert = /run/secrets/pip-ca"; fi
  if [ -n "$index" ]; then echo "index-url = $index"; fi
  echo "timeout = 120"
} >"$secrets/pip.conf"
if [ -f "$ca" ]; then cp "$ca" "$secrets/pip-ca"; else : >"$secrets/pip-ca"; fi

say "buildah bud -t $IMAGE (PYTHON_IMAGE=$BASE)"
started=$(date +%s)
# Docker's image format: OCI's has no SHELL, and the Dockerfile's RUNs are bash with pipefail.
buildah bud --quiet --format docker --isolation chroot --network host \
  --build-arg PYTHON_IMAGE="$BASE" \
  --secret id=pip.conf,src="$secrets/pip.conf" --secret id=pip-ca,src="$secrets/pip-ca" \
  -t "$IMAGE" -f Dockerfile .
say "built in $(($(date +%s) - started)) s"
# The image this tag named before is no longer needed (vfs keeps every layer as a full copy), nor
# are the working containers of image checks that were stopped before they could remove their own.
buildah containers --format '{{.ContainerName}}' | { grep '^egret-image-check-' || true; } |
  xargs -r buildah --storage-driver vfs rm >/dev/null
buildah rmi --prune >/dev/null || echo "image: could not remove the previous image (still in use?)" >&2

# --- 4. size and SBOM -----------------------------------------------------------------------
mkdir -p "$OUT"
container=$(buildah from --pull=never "$IMAGE")
trap 'rm -rf "$secrets"; buildah rm "$container" >/dev/null 2>&1 || true' EXIT
mountpoint=$(buildah mount "$container")
# cyclonedx-py asks the environment's interpreter for its sys.path, then reads the packages'
# metadata there: the image's own interpreter answers, run in the image's root, naming the
# directories under the mount where this host reads them.
cat >"$secrets/image-python" <<SH
#!/bin/sh
exec chroot "$mountpoint" /opt/egret/bin/python -c \\
  'import json, sys; json.dump([sys.argv[1] + p for p in sys.path if p.startswith("/")], sys.stdout)' \\
  "$mountpoint"
SH
chmod +x "$secrets/image-python"
"$CYCLONEDX" environment --output-reproducible --of JSON -o "$OUT/sbom.cdx.json" \
  --pyproject pyproject.toml "$secrets/image-python"
# The size as `buildah images` (and `docker images`) gives it, and the root filesystem's bytes.
python3 - "$IMAGE" "$BASE" "$mountpoint" "$OUT/image.json" <<'PY'
import json, subprocess, sys

image, base, rootfs, out = sys.argv[1:]
def listed(name: str) -> dict:
    found = json.loads(subprocess.check_output(["buildah", "--storage-driver", "vfs", "images", "--json", name]))
    return {"name": name, "id": found[0]["id"], "digest": found[0]["digest"], "size": found[0]["size"]}
def du(path: str) -> int:
    return int(subprocess.check_output(["du", "-sb", "--one-file-system", path]).split()[0])
record = {
    **listed(image), "rootfs_bytes": du(rootfs), "venv_bytes": du(f"{rootfs}/opt/egret"), "base": listed(base),
}
json.dump(record, open(out, "w"), indent=2)
mib = lambda n: f"{n / 2**20:.0f} MiB"
print(f"image: {image} {record['id']}: {record['size']} ({mib(record['rootfs_bytes'])} on disk, "
      f"/opt/egret {mib(record['venv_bytes'])}; base {record['base']['size']})")
PY
buildah umount "$container" >/dev/null
python3 - "$OUT/sbom.cdx.json" <<'PY'
import json, sys

bom = json.load(open(sys.argv[1]))
names = {c["name"].lower() for c in bom.get("components", [])}
print(f"image: SBOM {sys.argv[1]}: CycloneDX {bom['specVersion']}, {len(names)} packages")
PY
