# Sourced by the guest benches. vm_bench_setup [TOOL...] sets $vmrun to
# ../shared/vm/vmrun.sh (or $VDK_VMRUN) and checks the tools every guest bench needs and the
# TOOLs named, saying what to install.
vm_bench_setup() {
  vmrun=${VDK_VMRUN:-$(pwd)/../shared/vm/vmrun.sh}
  [ -x "$vmrun" ] || vmrun=/work/shared/vm/vmrun.sh
  [ -x "$vmrun" ] || { echo "bench needs shared/vm/vmrun.sh (or VDK_VMRUN)" >&2; exit 1; }
  for tool in fio qemu-system-x86_64 python3 "$@"; do
    command -v "$tool" >/dev/null || { echo "bench needs $tool: run scripts/install-test-deps.sh" >&2; exit 1; }
  done
}
