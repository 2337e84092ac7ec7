"""Reading a big file out of an ISO image: vdk's ISO browser beside xorriso, in one run.

One ISO (made by xorriso, Rock Ridge) holds a file of --size MiB of random bytes. Each run
copies it out twice, the tools taking turns: `cat` from the mount of `vdk fs mount` (freshly
mounted, so nothing is in the FUSE page cache) into a file, and `xorriso -osirrox on -extract`
into a file, both into /dev/shm (RAM, so that disk write-back does not decide the race); then
`cat` from a fresh mount into /dev/null, the read alone. The ISO itself stays in the page
cache and every copy starts after a sync, so what is measured is the two readers. Each figure
is the median of --runs runs.
"""
import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def timed(argv, **kw):
    subprocess.run(["sync"], check=True)
    t0 = time.time()
    subprocess.run(argv, check=True, **kw)
    return time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vdk", default="target/release/vdk")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=1024, help="MiB in the big file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("the daemon mounts FUSE file systems as root: run the benchmark as root")
    vdk = os.path.abspath(args.vdk)
    tmp = tempfile.mkdtemp(prefix="vdk-bench-isofs-")
    env = dict(os.environ, VDK_SOCKET=os.path.join(tmp, "run", "control.sock"), RUST_LOG="warn")
    times = {}
    try:
        tree = os.path.join(tmp, "tree")
        os.makedirs(tree)
        with open(os.path.join(tree, "big.bin"), "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(1 << 20))
        iso = os.path.join(tmp, "big.iso")
        subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-iso-level", "3", "-R",
                        "-o", iso, tree], check=True)
        shutil.rmtree(tree)
        with open(iso, "rb") as f:
            while f.read(1 << 24):
                pass
        mnt = os.path.join(tmp, "mnt")

        def mount():
            subprocess.run([vdk, "fs", "mount", iso, mnt], check=True, env=env,
                           stdout=subprocess.DEVNULL)

        def unmount():
            subprocess.run([vdk, "fs", "unmount", mnt], check=True, env=env,
                           stdout=subprocess.DEVNULL)

        shm = "/dev/shm" if os.path.isdir("/dev/shm") else tmp
        out = os.path.join(shm, "vdk-bench-isofs-out.bin")
        for r in range(args.runs):
            mount()
            with open(out, "wb") as o:
                t = timed(["cat", os.path.join(mnt, "big.bin")], stdout=o)
            times.setdefault("vdk cat > file", []).append(t)
            unmount()
            os.remove(out)
            t = timed(["xorriso", "-osirrox", "on", "-indev", iso, "-extract", "/big.bin", out],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times.setdefault("xorriso -extract > file", []).append(t)
            os.remove(out)
            mount()
            t = timed(["cat", os.path.join(mnt, "big.bin")], stdout=subprocess.DEVNULL)
            times.setdefault("vdk cat > /dev/null", []).append(t)
            unmount()
            print("run %d: %s" % (r + 1, ", ".join("%s %.2f s" % (k, v[-1]) for k, v in times.items())),
                  file=sys.stderr)
    finally:
        subprocess.run([vdk, "daemon", "--stop"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    mib = args.size
    print("# one %d MiB file out of an ISO (Rock Ridge), %s, %s, %d cores, median of %d runs" %
          (mib, time.strftime("%Y-%m-%d"), platform.platform(), os.cpu_count(), args.runs))
    print()
    print("| copy | time | MiB/s | vs xorriso |")
    print("| --- | --- | --- | --- |")
    base = med["xorriso -extract > file"]
    for k in ("vdk cat > file", "xorriso -extract > file", "vdk cat > /dev/null"):
        print("| %s | %.2f s | %.0f | %.2f |" % (k, med[k], mib / med[k], base / med[k]))


if __name__ == "__main__":
    main()
