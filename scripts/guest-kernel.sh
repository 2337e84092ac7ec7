#!/usr/bin/env bash
# Prepares a guest kit for ../shared/vm/vmrun.sh with a newer Debian kernel than its default
# 6.12 (for what 6.12 lacks: ublk's live resize, UPDATE_SIZE, is Linux 6.16), so that the guest
# tests can run on it:
#
#   scripts/guest-kernel.sh                        # trixie-backports' newest, into /var/tmp/vmkit-VERSION
#   VMKIT=/var/tmp/vmkit-6.17.13+deb13-amd64 VM_KERNEL=6.17.13+deb13-amd64 \
#       cargo test -p vdk --test kernel_attach
#
# With LINK=PATH, PATH becomes a symbolic link to the kit (whose file `version` names its
# kernel): scripts/install-test-deps.sh makes /var/tmp/vmkit-newer so, for the guest test of
# what only newer kernels have (ublk zero copy and live resize). A 170 MB download, once.
# Needs curl, xz, dpkg, depmod, busybox, and a kit made once by vmrun.sh itself (its init
# script is reused).
set -euo pipefail
suite=${SUITE:-trixie-backports}
mirror=${MIRROR:-http://deb.debian.org/debian}
base=${VMKIT_BASE:-/var/tmp/vmkit}
[ -e "$base/ir/init" ] || { echo "run vmrun.sh once first (it makes $base)" >&2; exit 1; }
packages=$(mktemp)
trap 'rm -f "$packages"' EXIT
curl -fsS "$mirror/dists/$suite/main/binary-amd64/Packages.xz" | xz -dc > "$packages"
# KERNEL picks a version (6.17.13+deb13-amd64); the newest amd64 one otherwise.
version=${KERNEL:-$(sed -n 's|^Package: linux-image-\([0-9.]*+deb[0-9]*-amd64\)$|\1|p' "$packages" |
  sort -V | tail -1)}
[ -n "$version" ] || { echo "no amd64 kernel image in $suite" >&2; exit 1; }
# The image, and where newer kernels split them out, the binary and the modules.
debs=$(awk -v v="$version" '
  /^Package: / { keep = ($2 == "linux-image-" v || $2 == "linux-binary-" v || $2 == "linux-modules-" v) }
  keep && /^Filename: / { print $2 }' "$packages")
[ -n "$debs" ] || { echo "no packages for $version in $suite" >&2; exit 1; }
kit=${VMKIT:-/var/tmp/vmkit-$version}
done_with() {
  echo "$version" > "$kit/version"
  if [ -n "${LINK:-}" ]; then ln -sfn "$kit" "$LINK"; fi
  echo "VMKIT=$kit VM_KERNEL=$version"
}
if [ -e "$kit/initrd.gz" ]; then
  done_with
  exit 0
fi
rm -rf "$kit.tmp"
mkdir -p "$kit.tmp/ir/m" "$kit.tmp/ir/sbin"
cd "$kit.tmp"
for deb in $debs; do
  curl -fsS -o kernel.deb "$mirror/$deb"
  dpkg -x kernel.deb k
  rm kernel.deb
done
# Newer Debian kernels keep their modules under /usr/lib (merged /usr): the kit wants /lib.
if [ -d k/usr/lib/modules ]; then
  mkdir -p k/lib
  mv k/usr/lib/modules k/lib/modules
fi
# ... and the kernel itself beside them, where vmrun.sh looks in /boot.
if [ ! -e "k/boot/vmlinuz-$version" ]; then
  mkdir -p k/boot
  cp "k/lib/modules/$version/vmlinuz" "k/boot/vmlinuz-$version"
fi
depmod -b k "$version"
cp "$(command -v busybox)" ir/busybox
for m in fs/netfs/netfs net/9p/9pnet net/9p/9pnet_virtio fs/9p/9p; do
  xz -dc "k/lib/modules/$version/kernel/$m.ko.xz" > "ir/m/${m##*/}.ko"
done
cp "$base/ir/init" ir/init
cp "$base/ir/sbin/modprobe" ir/sbin/modprobe
(cd ir && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > initrd.gz
cd /
mv "$kit.tmp" "$kit"
done_with
