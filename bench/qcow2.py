"""A qcow2 image served by vdk beside the same served by qemu-nbd, in one run.

For each run both servers get a fresh, empty qcow2 image (made by qemu-img, 64 KiB clusters,
on the same file system) and fio's nbd engine (queue depth 16) runs, in this order:
4 KiB random writes into the empty image (every first write to a cluster allocates it),
1 MiB sequential writes (allocating the rest), then 4 KiB random reads and 1 MiB sequential
reads of the now allocated image. The servers take turns on each workload; each figure is
the median of --runs runs. qemu-nbd runs with --cache=writeback and 16 connections allowed.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Server, fio  # noqa: E402

WORKLOADS = [("randwrite", "4k"), ("write", "1m"), ("randread", "4k"), ("read", "1m")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vdk", default="target/release/vdk")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    args = ap.parse_args()
    vdk = os.path.abspath(args.vdk)
    results = {}
    for r in range(args.runs):
        tmp = tempfile.mkdtemp(prefix="vdk-bench-qcow2-")
        servers = []
        try:
            for name in ("vdk", "qemu-nbd"):
                img = os.path.join(tmp, name + ".qcow2")
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1G"], check=True)
                sock = os.path.join(tmp, name + ".sock")
                if name == "vdk":
                    argv = [vdk, "serve", img, "--listen", "unix://" + sock]
                    uri = "nbd+unix:///%s?socket=%s" % (os.path.basename(img), sock)
                else:
                    argv = ["qemu-nbd", "-f", "qcow2", "-t", "-e", "16", "--cache=writeback",
                            "-k", sock, img]
                    uri = "nbd+unix:///?socket=%s" % sock
                s = Server(name, "qcow2", "unix", argv, uri, ("unix", sock))
                s.start()
                servers.append(s)
            for rw, bs in WORKLOADS:
                for s in servers:
                    mbps, iops = fio(s.uri, rw, bs, args.runtime)
                    results.setdefault((rw, bs, s.name), []).append((mbps, iops))
                    print("run %d %-5s %-9s %-8s %8.1f MB/s %9.0f IOPS" %
                          (r + 1, bs, rw, s.name, mbps, iops), file=sys.stderr)
        finally:
            for s in servers:
                s.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    med = {k: (statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals))
           for k, vals in results.items()}
    print("# qcow2 served over NBD (Unix socket), %s, %s, %d cores, fio nbd engine, iodepth 16,"
          " median of %d x %d s" % (time.strftime("%Y-%m-%d"), platform.platform(),
                                    os.cpu_count(), args.runs, args.runtime))
    print()
    print("| workload | vdk | qemu-nbd | vdk/qemu-nbd |")
    print("| --- | --- | --- | --- |")
    for rw, bs in WORKLOADS:
        vm, vi = med[(rw, bs, "vdk")]
        qm, qi = med[(rw, bs, "qemu-nbd")]
        label = "%s %s%s" % (bs, rw, " (allocating)" if "write" in rw else "")
        if bs == "4k":
            print("| %s | %.0f IOPS | %.0f IOPS | %.2f |" % (label, vi, qi, vi / qi))
        else:
            print("| %s | %.0f MB/s | %.0f MB/s | %.2f |" % (label, vm, qm, vm / qm))


if __name__ == "__main__":
    main()
