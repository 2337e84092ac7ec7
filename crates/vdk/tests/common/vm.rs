//! Throwaway guests: `../shared/vm/vmrun.sh` boots Debian's 6.12 kernel under QEMU with this
//! host's root read-only and a scratch directory read-write, and runs a shell script there as
//! root. Timings inside the software-emulated guest mean nothing; nothing times anything.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{need, path_env, stdout};

/// The guest runner: `VDK_VMRUN`, or `shared/vm/vmrun.sh` beside the project (or beside
/// the development checkout, /work, for a clone elsewhere).
pub fn vmrun() -> PathBuf {
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/vm/vmrun.sh");
    let path = std::env::var_os("VDK_VMRUN").map_or_else(
        || {
            [beside.clone(), PathBuf::from("/work/shared/vm/vmrun.sh")]
                .into_iter()
                .find(|p| p.exists())
                .unwrap_or(beside)
        },
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "these tests boot a guest with {} (or VDK_VMRUN): it is missing",
        path.display()
    );
    need("qemu-system-x86_64");
    need("busybox");
    path
}

/// The absolute path of `tool` here (the guest sees this host's root).
pub fn tool(name: &str) -> String {
    need(name);
    let found = stdout(
        Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .env("PATH", format!("{}:/root/.cargo/bin", path_env())),
    );
    found.trim().to_owned()
}

/// fsx settings for a file system and for a block device (fixed size, any offset).
pub const FSX_CONFIGS: &str = r#"
cat > fsx-fs.toml <<'E'
flen = 8388608
[opsize]
max = 262144
[weights]
close_open = 1
truncate = 2
posix_fallocate = 1
punch_hole = 1
fsync = 1
invalidate = 1
E
cat > fsx-dev.toml <<'E'
blockmode = true
nosizechecks = true
[opsize]
max = 524288
[weights]
close_open = 0
truncate = 0
posix_fallocate = 0
read = 10
write = 10
mapread = 2
mapwrite = 2
punch_hole = 0
fsync = 1
fdatasync = 1
E
"#;

/// Runs `script` in a guest whose working directory is `dir` (shared with this host), with
/// `env` for vmrun.sh (VM_QEMU_ARGS and such); what it printed. The script runs under
/// `sh -eu` with `$FSX` fsx and `$FIO` fio; it fails the test by failing. Tools must not
/// live under /tmp (the guest's own).
pub fn boot(dir: &Path, script: &str, env: &[(&str, String)]) -> String {
    let runner = vmrun();
    let body = format!(
        "set -eu\nFSX={}\nFIO={}\n{script}",
        tool("fsx"),
        tool("fio")
    );
    std::fs::write(dir.join("test.sh"), body).unwrap();
    let out = Command::new(runner)
        .arg("sh test.sh")
        .current_dir(dir)
        .env("VM_MEM", "768")
        // Software emulation on a loaded machine (the suite runs tests in parallel) is slow:
        // room beyond vmrun.sh's 600 s, never a figure the test relies on.
        .env("VM_TIMEOUT", "1500")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run vmrun.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the guest script failed ({}):\n{text}",
        out.status
    );
    text
}
