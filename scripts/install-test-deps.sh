#!/usr/bin/env bash
# Installs what vdk's tests and benchmarks use, on Debian or Ubuntu: the Rust toolchain's
# clippy and rustfmt (if rustup is there) and the real NBD clients and peers the tests drive.
# Safe to run again: it installs only what is missing.
set -euo pipefail

packages=(
  libnbd-bin      # nbdinfo, nbdcopy, nbdfuse (the export as a file, for loop devices)
  python3-libnbd  # nbdsh
  nbdkit          # peer in benchmarks
  qemu-utils      # qemu-img, qemu-io, qemu-nbd
  fuse3           # fusermount3
  fio             # benchmarks (nbd engine)
  e2fsprogs       # mkfs.ext4, fsck.ext4
  xfsprogs        # mkfs.xfs (vdk open --mkfs xfs)
  dosfstools      # mkfs.vfat (vdk open --mkfs vfat)
  xorriso         # ISO images for the iso format and ISO browser tests
  genisoimage     # ISO images with Rock Ridge deep-directory relocation
  libiscsi-bin    # iscsi-ls, iscsi-inq, iscsi-readcapacity16, iscsi-test-cu, iscsi-perf
  libiscsi-dev    # the MMC test client is built against libiscsi
  gcc             # ... with the C compiler
  tgt             # tgtd: the peer iSCSI target in benchmarks and the iscsi-test-cu comparison
  fdisk           # sfdisk: MBR and GPT tables for the partition filter tests
  mount           # losetup, mount
  util-linux      # setpriv (a test drops root to see a permission error)
  python3         # nbdsh runs on Debian's python3
  python3-venv    # moto_server, the S3 server of the object-store tests, in a venv of its own
  s3backer        # the peer of the object-store disk in benchmarks
  openssl         # test certificates (CA, server, clients) for NBD over TLS
  iproute2        # ip: a network namespace for the half-open TCP connection test
  gcc-mingw-w64-x86-64  # the Windows build: vdk.exe's link and its TLS library's C code
  wine64          # runs vdk.exe in the Windows tests (tests/windows.rs)
  libclang-dev    # libublk's build reads the kernel's ublk_cmd.h with bindgen
  busybox-static  # the throwaway guest of the kernel-attach tests (../shared/vm/vmrun.sh) ...
  kmod            # ... loads ublk_drv and nbd in it
  nbd-client      # the kernel NBD client's own tool, beside vdk's attach, in the guest
  cryptsetup-bin  # LUKS2 images (luksFormat on a file, no dm-crypt) and their volume keys ...
  python3-cryptography  # ... which decrypt them in the LUKS tests, apart from vdk's code
  prometheus      # promtool checks the metrics endpoint's text format (curl scrapes it)
  curl            # scripts/guest-kernel.sh fetches a newer guest kernel ...
  xz-utils        # ... and unpacks its package index
  bsdutils        # script: a pseudo-terminal for the passphrase prompt test
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# qemu-img and qemu-io reach iscsi:// through qemu-block-extra, which must be the very
# version of qemu-utils (a mismatch makes apt replace qemu-utils). That may be a backport.
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
qemu_version=$(dpkg-query -W -f='${Version}' qemu-utils)
if ! dpkg-query -W -f='${Status} ${Version}\n' qemu-block-extra 2>/dev/null \
    | grep -qx "install ok installed $qemu_version"; then
  echo "installing: qemu-block-extra=$qemu_version"
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      "qemu-block-extra=$qemu_version" qemu-utils; then
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    echo "qemu-block-extra $qemu_version is not in the sources; adding $codename-backports"
    echo "deb http://deb.debian.org/debian $codename-backports main" \
      | $sudo tee /etc/apt/sources.list.d/vdk-backports.list >/dev/null
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      "qemu-block-extra=$qemu_version" qemu-utils
  fi
fi

# The guest's QEMU, from where qemu-utils came from (its data files must match it).
if ! dpkg-query -W -f='${Status} ${Version}\n' qemu-system-x86 2>/dev/null \
    | grep -qx "install ok installed $qemu_version"; then
  echo "installing: qemu-system-x86=$qemu_version"
  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  from=()
  case "$qemu_version" in *bpo*) from=(-t "$codename-backports") ;; esac
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${from[@]}" "qemu-system-x86=$qemu_version"
fi
# The guest's kernel and initramfs, made once by vmrun.sh itself (it downloads Debian's
# kernel package); done here so that parallel tests do not race to make them.
vmrun="$(cd "$(dirname "$0")/../.." && pwd)/shared/vm/vmrun.sh"
[ -x "$vmrun" ] || vmrun=/work/shared/vm/vmrun.sh
if [ -x "$vmrun" ] && [ ! -e "${VMKIT:-/var/tmp/vmkit}/initrd.gz" ]; then
  echo "preparing the test guest's kernel"
  (cd "$(mktemp -d)" && "$vmrun" true)
fi
# A second guest kernel, newer (trixie-backports'), for what 6.12 lacks: ublk zero copy and
# live resize (Linux 6.16). Made once; kernel_attach.rs boots it through this link.
if [ -x "$vmrun" ] && [ ! -e /var/tmp/vmkit-newer/version ]; then
  echo "preparing the newer test guest's kernel"
  VMKIT_BASE="${VMKIT:-/var/tmp/vmkit}" VMKIT= LINK=/var/tmp/vmkit-newer "$(dirname "$0")/guest-kernel.sh"
fi

if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
fi
# fsx, the file system exerciser, is a Rust program: from crates.io, pinned.
FSX_VERSION=0.3.2
if ! command -v fsx >/dev/null 2>&1 || ! fsx --version 2>/dev/null | grep -q "$FSX_VERSION"; then
  echo "installing fsx $FSX_VERSION"
  cargo install --quiet --locked --version "$FSX_VERSION" fsx
fi
# Real S3-protocol servers for the object-store tests, where the tests look for them:
# moto_server (PyPI moto[server], in a venv) and s3s-fs (crates.io), pinned.
tools=${VDK_TEST_TOOLS:-}
if [ -z "$tools" ]; then
  if [ "$(id -u)" -eq 0 ]; then tools=/opt/vdk-test; else tools="$HOME/.local/share/vdk-test"; fi
fi
MOTO_VERSION=5.2.5
if ! "$tools/moto/bin/pip" show moto 2>/dev/null | grep -qx "Version: $MOTO_VERSION"; then
  echo "installing moto[server] $MOTO_VERSION into $tools/moto"
  python3 -m venv "$tools/moto"
  "$tools/moto/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
fi
mkdir -p "$tools/bin"
ln -sf "$tools/moto/bin/moto_server" "$tools/bin/moto_server"
S3S_FS_VERSION=0.14.1
if ! "$tools/bin/s3s-fs" --version 2>/dev/null | grep -q "$S3S_FS_VERSION"; then
  echo "installing s3s-fs $S3S_FS_VERSION into $tools"
  cargo install --quiet --locked --version "$S3S_FS_VERSION" --features binary --root "$tools" s3s-fs
fi
# pjdfstest, the POSIX file system test suite, for the cloud drive (crates.io, pinned); it
# switches to the users nobody and tests.
PJDFSTEST_VERSION=0.2.2
if ! "$tools/bin/pjdfstest" --version 2>/dev/null | grep -q "$PJDFSTEST_VERSION"; then
  echo "installing pjdfstest $PJDFSTEST_VERSION into $tools"
  cargo install --quiet --locked --version "$PJDFSTEST_VERSION" --root "$tools" pjdfstest
fi
if [ "$(id -u)" -eq 0 ] && ! id tests >/dev/null 2>&1; then
  useradd --system --no-create-home --user-group tests
fi
echo "test dependencies are installed"
