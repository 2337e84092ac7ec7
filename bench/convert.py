"""vdk convert beside qemu-img convert: a 4 GiB raw image, half of it data (in 64 MiB runs
of random bytes, the rest holes), converted to qcow2 and back to raw by each tool. Each
figure is the median wall time of --runs runs; the tools take turns. Outputs are checked
equal with qemu-img compare once.

vdk convert makes its output durable (fdatasync) before it returns. qemu-img convert does
that with -t writeback; by default it runs with cache=unsafe and never syncs, so the data may
still be in the page cache when it exits. The ratio compares like with like (writeback); the
unsafe default is shown too.
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

GIB = 1 << 30
RUN = 64 << 20


def timed(cmd):
    start = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vdk", default="target/release/vdk")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    vdk = os.path.abspath(args.vdk)
    tmp = tempfile.mkdtemp(prefix="vdk-bench-convert-")
    try:
        src = os.path.join(tmp, "src.raw")
        with open(src, "wb") as f:
            f.truncate(4 * GIB)
            block = os.urandom(RUN)
            for i in range(0, 4 * GIB // RUN, 2):
                f.seek(i * RUN)
                f.write(block)
        tools = {
            "vdk": lambda a, b, fmt: [vdk, "convert", "-q", "-O", fmt, a, b],
            "qemu-img": lambda a, b, fmt: ["qemu-img", "convert", "-t", "writeback", "-O", fmt, a, b],
            "qemu-img unsafe": lambda a, b, fmt: ["qemu-img", "convert", "-O", fmt, a, b],
        }
        times = {}
        subprocess.run(["sync"])
        time.sleep(5)
        # Round 0 warms up (and lets the source's own writeback finish); it is not counted.
        for r in range(args.runs + 1):
            for name, cmd in tools.items():
                q = os.path.join(tmp, name.replace(" ", "-") + ".qcow2")
                back = os.path.join(tmp, name.replace(" ", "-") + ".raw")
                for p in (q, back):
                    if os.path.exists(p):
                        os.remove(p)
                subprocess.run(["sync"])
                time.sleep(1)
                t1 = timed(cmd(src, q, "qcow2"))
                subprocess.run(["sync"])
                time.sleep(1)
                t2 = timed(cmd(q, back, "raw"))
                if r > 0:
                    times.setdefault((name, "raw to qcow2"), []).append(t1)
                    times.setdefault((name, "qcow2 to raw"), []).append(t2)
                print("run %d %-15s raw->qcow2 %.2f s, qcow2->raw %.2f s" % (r, name, t1, t2),
                      file=sys.stderr)
                if r == 1:
                    subprocess.run(["qemu-img", "compare", "-q", src, q], check=True)
                    subprocess.run(["qemu-img", "compare", "-q", src, back], check=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("# convert, 4 GiB raw with 2 GiB of data, %s, %s, %d cores, median of %d runs"
          % (time.strftime("%Y-%m-%d"), platform.platform(), os.cpu_count(), args.runs))
    print()
    print("| conversion | vdk convert | qemu-img convert -t writeback | vdk speed / qemu-img | qemu-img default (unsafe, no sync) |")
    print("| --- | --- | --- | --- | --- |")
    for what in ("raw to qcow2", "qcow2 to raw"):
        v = statistics.median(times[("vdk", what)])
        q = statistics.median(times[("qemu-img", what)])
        u = statistics.median(times[("qemu-img unsafe", what)])
        print("| %s | %.2f s | %.2f s | %.2f | %.2f s |" % (what, v, q, q / v, u))


if __name__ == "__main__":
    main()
