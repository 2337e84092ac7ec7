"""vdk's iSCSI target beside tgt on the same work, in one run.

Both targets serve a copy of one 1 GiB image of random bytes (raw files on the same file
system, in the page cache: what is measured is the targets, not the disk), each on its own
loopback portal. Reads: libiscsi's iscsi-perf, sequential at 128 KiB and 4 KiB per request and
random at 4 KiB, 16 requests in flight. Writes: qemu-img bench through QEMU's libiscsi
driver, 4 KiB and 64 KiB requests, 16 in flight. The targets take turns on each workload;
each figure is the median of --runs runs. tgtd runs with its default 16 I/O threads and the
rdwr backing store (buffered, as vdk serves a raw file).
"""
import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import free_port, wait_for  # noqa: E402

GIB = 1 << 30
READS = [("seq 128k", ["-b", "256"]), ("seq 4k", ["-b", "8"]), ("random 4k", ["-b", "8", "-r"])]
WRITES = [("write 4k", "4k"), ("write 64k", "64k")]


def perf(url, opts, seconds):
    """iscsi-perf's average IOPS and MB/s over `seconds`."""
    out = subprocess.run(["iscsi-perf", "-t", str(seconds), "-m", "16"] + opts + [url],
                         capture_output=True, text=True, timeout=seconds + 60)
    m = re.findall(r"iops average (\d+) \((\d+) MB/s\)", out.stdout + out.stderr)
    if not m:
        raise RuntimeError("iscsi-perf printed no average:\n" + out.stdout + out.stderr)
    iops, mbs = m[-1]
    return float(mbs), float(iops)


def qemu_bench(url, bs, count):
    """qemu-img bench writes: MB/s and IOPS."""
    t0 = time.time()
    subprocess.run(["qemu-img", "bench", "-w", "-f", "raw", "-t", "none", "-d", "16", "-s", bs,
                    "-c", str(count), "--pattern=0x5a", url], check=True, capture_output=True,
                   timeout=600)
    dt = time.time() - t0
    size = int(bs[:-1]) * 1024
    return count * size / dt / 1e6, count / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vdk", default="target/release/vdk")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=8, help="seconds per iscsi-perf run")
    ap.add_argument("--vdk-before", default=None,
                    help="another vdk binary (an earlier build) measured in the same rounds")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("tgtd needs root: run the benchmark as root")
    vdk = os.path.abspath(args.vdk)
    tmp = tempfile.mkdtemp(prefix="vdk-bench-iscsi-")
    procs = []
    results = {}
    try:
        src = os.path.join(tmp, "src.img")
        with open(src, "wb") as f:
            for _ in range(GIB >> 20):
                f.write(os.urandom(1 << 20))
        builds = [("vdk", vdk)]
        if args.vdk_before:
            builds.append(("vdk-before", os.path.abspath(args.vdk_before)))
        for name in [b[0] + ".img" for b in builds] + ["tgt.img"]:
            shutil.copyfile(src, os.path.join(tmp, name))
        os.remove(src)
        tport, control = free_port(), free_port() % 1000 + 100
        urls = {}
        for name, binary in builds:
            port = free_port()
            procs.append(subprocess.Popen(
                [binary, "serve", "--listen", "iscsi://127.0.0.1:%d" % port,
                 os.path.join(tmp, name + ".img")],
                env=dict(os.environ, RUST_LOG="warn"), stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
            wait_for(("tcp", port))
            urls[name] = "iscsi://127.0.0.1:%d/iqn.2026-11.org.vdk:%s.img/0" % (port, name)
        procs.append(subprocess.Popen(
            ["tgtd", "-f", "-C", str(control), "--iscsi", "portal=127.0.0.1:%d" % tport],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(("tcp", tport))
        iqn = "iqn.2026-11.org.vdk.bench:tgt"
        adm = ["tgtadm", "-C", str(control), "--lld", "iscsi"]
        subprocess.run(adm + ["--op", "new", "--mode", "target", "--tid", "1", "-T", iqn], check=True)
        subprocess.run(adm + ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                              "-b", os.path.join(tmp, "tgt.img")], check=True)
        subprocess.run(adm + ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"], check=True)
        urls["tgt"] = "iscsi://127.0.0.1:%d/%s/1" % (tport, iqn)
        # Every image in the page cache before anything is timed.
        for name in [n + ".img" for n in urls]:
            with open(os.path.join(tmp, name), "rb") as f:
                while f.read(1 << 24):
                    pass
        for r in range(args.runs):
            # Each target goes first in one round, so that no position favours one every time.
            names = list(urls)
            names = names[r % len(names):] + names[:r % len(names)]
            for label, opts in READS:
                for name, url in [(n, urls[n]) for n in names]:
                    mbs, iops = perf(url, opts, args.runtime)
                    results.setdefault((label, name), []).append((mbs, iops))
                    print("run %d %-10s %-4s %7.0f MB/s %8.0f IOPS" % (r + 1, label, name, mbs, iops),
                          file=sys.stderr)
            for label, bs in WRITES:
                count = 60000 if bs == "4k" else 12000
                for name, url in [(n, urls[n]) for n in names]:
                    mbs, iops = qemu_bench(url, bs, count)
                    results.setdefault((label, name), []).append((mbs, iops))
                    print("run %d %-10s %-4s %7.0f MB/s %8.0f IOPS" % (r + 1, label, name, mbs, iops),
                          file=sys.stderr)
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: (statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals))
           for k, vals in results.items()}
    print("# iSCSI over loopback TCP, %s, %s, %d cores; reads iscsi-perf, writes qemu-img bench,"
          " 16 in flight, median of %d runs" % (time.strftime("%Y-%m-%d"), platform.platform(),
                                                os.cpu_count(), args.runs))
    print()
    peers = [p for p in ("tgt", "vdk-before") if any(k[1] == p for k in med)]
    print("| workload | vdk | " + " | ".join("%s | vdk/%s" % (p, p) for p in peers) + " |")
    print("| --- | --- | " + " | ".join("--- | ---" for _ in peers) + " |")
    for label, _ in READS + WRITES:
        big = "128k" in label or "64k" in label
        fmt = (lambda m, i: "%.0f MB/s" % m) if big else (lambda m, i: "%.0f IOPS" % i)
        pick = (lambda m, i: m) if big else (lambda m, i: i)
        vm, vi = med[(label, "vdk")]
        cells = []
        for p in peers:
            pm, pi = med[(label, p)]
            cells.append("%s | %.2f" % (fmt(pm, pi), pick(vm, vi) / pick(pm, pi)))
        print("| %s | %s | %s |" % (label, fmt(vm, vi), " | ".join(cells)))


if __name__ == "__main__":
    main()
