"""A file system on a vdk block device beside the same on nbdkit + nbdfuse + loop and on the
kernel's loop device alone, in one run.

Every stack ends in ext4 on a loop device with direct I/O, over the same kind of raw image on
the same file system:

  vdk:    vdk open IMAGE --mkfs ext4 --mount DIR        (fuse-loop: vdk's own FUSE export)
  vdk passthrough: the same with VDK_FUSE_PASSTHROUGH=1 (the raw image passed through to its
          file by the kernel)
  nbdkit: nbdkit file IMAGE, nbdfuse, losetup --direct-io=on, mkfs.ext4, mount
  kernel loop: losetup --direct-io=on IMAGE, mkfs.ext4, mount   (no user space at all)
  kernel loop buffered: the same with --direct-io=off (the image's page cache in between)

fio runs on a file in each mount (libaio, direct I/O, queue depth 16): 4 KiB random read and
write, 1 MiB sequential read and write. The stacks take turns within each
round, each going first in one round, and each figure is the median of --runs runs. Needs root.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

WORKLOADS = [("randread", "4k"), ("randwrite", "4k"), ("read", "1m"), ("write", "1m")]


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def wait_for(path, timeout=20):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise RuntimeError("%s did not appear" % path)
        time.sleep(0.05)


def loop_ext4(path, mnt, direct=True):
    """A loop device (with direct I/O unless told) on `path`, formatted ext4, mounted on `mnt`."""
    loop = sh("losetup", "--direct-io=" + ("on" if direct else "off"), "-f", "--show",
              path).strip()
    sh("mkfs.ext4", "-q", "-F", loop)
    os.makedirs(mnt, exist_ok=True)
    sh("mount", loop, mnt)
    return loop


def unmount_loop(mnt, loop):
    subprocess.run(["umount", mnt], capture_output=True)
    if loop:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


class VdkStack:
    def __init__(self, vdk, tmp, size, name="vdk", passthrough=False, fmt="raw", filters=()):
        self.vdk, self.tmp, self.size, self.name = vdk, tmp, size, name
        self.fmt, self.filters = fmt, list(filters)
        self.env = dict(os.environ, VDK_SOCKET=os.path.join(tmp, name + "-run", "control.sock"),
                        RUST_LOG="warn", VDK_FUSE_PASSTHROUGH="1" if passthrough else "0")
        self.mnt = os.path.join(tmp, name.replace(" ", "-") + "-mnt")
        self.image = os.path.join(tmp, name.replace(" ", "-") + ".img")

    def start(self):
        extra = ["--format", self.fmt]
        for f in self.filters:
            extra += ["--filter", f]
        sh(self.vdk, "open", self.image, self.size, *extra, "--mkfs", "ext4", "--mount", self.mnt,
           env=self.env)

    def stop(self):
        subprocess.run([self.vdk, "daemon", "--stop"], env=self.env, capture_output=True)


class NbdkitStack:
    name = "nbdkit+nbdfuse"

    def __init__(self, tmp, size):
        self.tmp, self.size = tmp, size
        self.sock = os.path.join(tmp, "nbdkit.sock")
        self.fuse = os.path.join(tmp, "nbdfuse")
        self.mnt = os.path.join(tmp, "nbdkit-mnt")
        self.image = os.path.join(tmp, "nbdkit.img")
        self.procs, self.loop = [], None

    def start(self):
        with open(self.image, "wb") as f:
            f.truncate(parse(self.size))
        self.procs.append(subprocess.Popen(
            ["nbdkit", "-f", "-U", self.sock, "file", self.image], stderr=subprocess.DEVNULL))
        wait_for(self.sock)
        os.makedirs(self.fuse, exist_ok=True)
        self.procs.append(subprocess.Popen(
            ["nbdfuse", self.fuse, "--unix", self.sock], stderr=subprocess.DEVNULL))
        wait_for(os.path.join(self.fuse, "nbd"))
        self.loop = loop_ext4(os.path.join(self.fuse, "nbd"), self.mnt)

    def stop(self):
        unmount_loop(self.mnt, self.loop)
        subprocess.run(["fusermount3", "-u", self.fuse], capture_output=True)
        for p in reversed(self.procs):
            p.terminate()
            p.wait()


class KernelLoopStack:
    """The kernel's own loop device straight on a raw image: the ceiling fuse-loop aims at.
    With direct I/O (as the other stacks' loop devices) it reads and writes the image's file
    with direct I/O; buffered, it goes through the image's page cache, as vdk's served path
    does."""

    def __init__(self, tmp, size, direct=True):
        self.tmp, self.size, self.direct = tmp, size, direct
        self.name = "kernel loop" if direct else "kernel loop buffered"
        tag = "loop" if direct else "loop-buffered"
        self.mnt = os.path.join(tmp, tag + "-mnt")
        self.image = os.path.join(tmp, tag + ".img")
        self.loop = None

    def start(self):
        with open(self.image, "wb") as f:
            f.truncate(parse(self.size))
        self.loop = loop_ext4(self.image, self.mnt, self.direct)

    def stop(self):
        unmount_loop(self.mnt, self.loop)


def parse(size):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def fio(directory, rw, bs, runtime, file_size):
    cmd = ["fio", "--name=bench", "--directory=" + directory, "--filename=fio.dat",
           "--ioengine=libaio", "--direct=1", "--rw=" + rw, "--bs=" + bs, "--iodepth=16",
           "--numjobs=1", "--size=" + file_size, "--time_based", "--runtime=%d" % runtime,
           "--output-format=json"]
    out = sh(*cmd)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side["bw_bytes"] / 1e6, side["iops"]


def prefill(directory, file_size):
    sh("fio", "--name=fill", "--directory=" + directory, "--filename=fio.dat",
       "--ioengine=libaio", "--direct=1", "--rw=write", "--bs=1m", "--iodepth=16",
       "--size=" + file_size)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vdk", default="target/release/vdk")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    ap.add_argument("--size", default="2G", help="size of each image")
    ap.add_argument("--file-size", default="1G", help="size of fio's file in each mount")
    ap.add_argument("--vdk-before", default=None,
                    help="another vdk binary (an earlier build) measured in the same rounds")
    ap.add_argument("--format", default="raw", choices=["raw", "qcow2"],
                    help="the vdk stacks' image format")
    ap.add_argument("--filter", action="append", default=[],
                    help="a filter spec for the vdk stacks (repeatable), e.g. stats")
    ap.add_argument("--vdk-only", action="store_true",
                    help="only the vdk stacks (with --vdk-before: this build against that one)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("the mount benchmark attaches loop devices and mounts file systems: run it as root")
    tmp = tempfile.mkdtemp(prefix="vdk-bench-mount-")
    served = dict(fmt=args.format, filters=args.filter)
    stacks = [VdkStack(os.path.abspath(args.vdk), tmp, args.size, **served)]
    # Passthrough is for raw images with no filter: any other disk is served either way.
    if args.format == "raw" and not args.filter:
        stacks.append(VdkStack(os.path.abspath(args.vdk), tmp, args.size, "vdk passthrough",
                               True))
    if not args.vdk_only:
        stacks += [NbdkitStack(tmp, args.size), KernelLoopStack(tmp, args.size),
                   KernelLoopStack(tmp, args.size, direct=False)]
    if args.vdk_before:
        stacks.append(VdkStack(os.path.abspath(args.vdk_before), tmp, args.size, "vdk-before",
                               **served))
    results = {}
    try:
        for s in stacks:
            s.start()
            prefill(s.mnt, args.file_size)
        for r in range(args.runs):
            # Each stack goes first in one round: the one after another's writes pays for
            # their writeback, so a fixed order would favour the same stack every round.
            order = stacks[r % len(stacks):] + stacks[:r % len(stacks)]
            for rw, bs in WORKLOADS:
                for s in order:
                    mbps, iops = fio(s.mnt, rw, bs, args.runtime, args.file_size)
                    results.setdefault((rw, bs, s.name), []).append((mbps, iops))
                    print("run %d %-5s %-9s %-15s %8.1f MB/s %9.0f IOPS" %
                          (r + 1, bs, rw, s.name, mbps, iops), file=sys.stderr)
    finally:
        for s in stacks:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: (statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals))
           for k, vals in results.items()}
    print("# ext4 on a FUSE-backed loop device, %s, %s, %d cores, fio libaio direct, iodepth 16,"
          " median of %d x %d s" % (time.strftime("%Y-%m-%d"), platform.platform(),
                                    os.cpu_count(), args.runs, args.runtime))
    print()
    names = [s.name for s in stacks]
    # Each vdk stack against both kernel loop devices, and against nbdkit + nbdfuse.
    pairs = [(v, b) for v in names if v.startswith("vdk")
             for b in ("kernel loop", "kernel loop buffered", "nbdkit+nbdfuse") if b in names]
    if "vdk-before" in names:
        pairs.append(("vdk", "vdk-before"))
    print("| workload | " + " | ".join(names) + " | " +
          " | ".join("%s/%s" % p for p in pairs) + " |")
    print("| --- " * (1 + len(names) + len(pairs)) + "|")
    for rw, bs in WORKLOADS:
        fmt = (lambda m, i: "%.0f IOPS" % i) if bs == "4k" else (lambda m, i: "%.0f MB/s" % m)
        pick = (lambda m, i: i) if bs == "4k" else (lambda m, i: m)
        figures = [fmt(*med[(rw, bs, n)]) for n in names]
        value = {n: pick(*med[(rw, bs, n)]) for n in names}
        ratios = ["%.2f" % (value[v] / value[b]) for v, b in pairs]
        print("| %s %s | %s | %s |" % (bs, rw, " | ".join(figures), " | ".join(ratios)))


if __name__ == "__main__":
    main()
