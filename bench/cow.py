"""The cow filter's cost: fio 4 KiB random writes and reads on a cow disk (vdk, overlay in
qcow2) against the raw file under it (vdk, no filter) and against nbdkit's cow filter over the
same base, in one run. fio's nbd engine, queue depth 16, Unix sockets. Each run gets fresh
overlays; writes run before reads, so reads hit both redirected and base blocks. Median of
--runs runs.
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

WORKLOADS = [("randwrite", "4k"), ("randread", "4k")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vdk", default="target/release/vdk")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    args = ap.parse_args()
    vdk = os.path.abspath(args.vdk)
    tmp = tempfile.mkdtemp(prefix="vdk-bench-cow-")
    base = os.path.join(tmp, "base.img")
    with open(base, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(1024):
            f.write(block)
    results = {}
    try:
        for r in range(args.runs):
            servers = []
            try:
                start_servers(servers, r, tmp, base, vdk)
                for rw, bs in WORKLOADS:
                    for s in servers:
                        mbps, iops = fio(s.uri, rw, bs, args.runtime)
                        results.setdefault((rw, s.name), []).append(iops)
                        print("run %d %-9s %-10s %9.0f IOPS" % (r + 1, rw, s.name, iops), file=sys.stderr)
            finally:
                for s in servers:
                    s.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, args)


def start_servers(servers, r, tmp, base, vdk):
    for name in ("vdk raw", "vdk cow", "nbdkit cow"):
        sock = os.path.join(tmp, name.replace(" ", "-") + ".sock")
        if name == "vdk raw":
            # Its own copy, so that its writes do not reach the others' base.
            img = os.path.join(tmp, "raw-copy.img")
            shutil.copyfile(base, img)
            argv = [vdk, "serve", img, "--listen", "unix://" + sock]
            uri = "nbd+unix:///raw-copy.img?socket=" + sock
        elif name == "vdk cow":
            overlay = os.path.join(tmp, "overlay-%d.qcow2" % r)
            argv = [vdk, "serve", base, "--filter", "cow:overlay=" + overlay,
                    "--listen", "unix://" + sock]
            uri = "nbd+unix:///base.img?socket=" + sock
        else:
            argv = ["nbdkit", "-f", "--exit-with-parent", "-U", sock, "--filter=cow",
                    "file", base]
            uri = "nbd+unix:///?socket=" + sock
        if os.path.exists(sock):
            os.remove(sock)
        s = Server(name, "cow", "unix", argv, uri, ("unix", sock))
        s.start()
        servers.append(s)


def report(results, args):
    med = {k: statistics.median(v) for k, v in results.items()}
    print("# cow filter, 1 GiB base of data, %s, %s, %d cores, fio nbd engine, iodepth 16, median of %d x %d s"
          % (time.strftime("%Y-%m-%d"), platform.platform(), os.cpu_count(), args.runs, args.runtime))
    print()
    print("| workload | vdk raw | vdk cow | nbdkit cow | cow overhead (vdk cow / vdk raw) | vdk cow / nbdkit cow |")
    print("| --- | --- | --- | --- | --- | --- |")
    for rw, bs in WORKLOADS:
        raw, cow, nk = med[(rw, "vdk raw")], med[(rw, "vdk cow")], med[(rw, "nbdkit cow")]
        print("| %s %s | %.0f IOPS | %.0f IOPS | %.0f IOPS | %.2f | %.2f |" % (bs, rw, raw, cow, nk, cow / raw, cow / nk))


if __name__ == "__main__":
    main()
