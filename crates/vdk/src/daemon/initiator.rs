//! Windows' built-in iSCSI initiator, driven for `--attach iscsi`: the daemon serves the disk
//! as a LUN on its loopback portal, then logs the initiator in (with CHAP), finds the disk
//! Windows made of it, brings it online, formats it or gives it a drive letter if asked; on
//! close it logs the session out. The decisions (what to ask PowerShell's iSCSI and Storage
//! modules, how to read their answers) are plain functions, unit-tested on any system; only
//! [`run`] calls PowerShell, and only Windows runs it.
// Compiled everywhere for its tests; the daemon calls it on Windows only.
#![cfg_attr(not(windows), allow(dead_code))]

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::control::{ApiError, ErrorKind};

/// A target the initiator logs in to.
#[derive(Clone, Debug)]
pub struct Login {
    /// The target's iSCSI name.
    pub iqn: String,
    /// The portal.
    pub portal: SocketAddr,
    /// CHAP user and secret, if the target asks for CHAP.
    pub chap: Option<(String, String)>,
}

/// A string as a PowerShell single-quoted literal (quotes inside doubled).
fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The script that adds the portal (once), logs in, and prints what the session brought: the
/// number of its disk, or for a CD-ROM (`cdrom_serial`: the serial number its INQUIRY
/// reports) the drive letter Windows gave it.
pub fn login_script(l: &Login, cdrom_serial: Option<&str>) -> String {
    let (addr, port) = (quoted(&l.portal.ip().to_string()), l.portal.port());
    let mut s = String::from("$ErrorActionPreference = 'Stop'\n");
    let _ = writeln!(
        s,
        "if (-not (Get-IscsiTargetPortal | Where-Object {{ $_.TargetPortalAddress -eq {addr} \
         -and $_.TargetPortalPortNumber -eq {port} }})) {{ New-IscsiTargetPortal \
         -TargetPortalAddress {addr} -TargetPortalPortNumber {port} | Out-Null }}"
    );
    let _ = write!(
        s,
        "Connect-IscsiTarget -NodeAddress {} -TargetPortalAddress {addr} \
         -TargetPortalPortNumber {port}",
        quoted(&l.iqn)
    );
    if let Some((user, secret)) = &l.chap {
        let _ = write!(
            s,
            " -AuthenticationType ONEWAYCHAP -ChapUsername {} -ChapSecret {}",
            quoted(user),
            quoted(secret)
        );
    }
    s.push_str(" | Out-Null\n");
    if let Some(serial) = cdrom_serial {
        // A CD/DVD drive is no Get-Disk disk: found by the serial number it reports.
        let _ = writeln!(
            s,
            "$cd = $null; foreach ($i in 1..100) {{ $cd = Get-CimInstance Win32_CDROMDrive | \
             Where-Object {{ \"$($_.SerialNumber)\".Trim() -eq {} }} | Select-Object -First 1; \
             if ($cd -and $cd.Drive) {{ break }}; Start-Sleep -Milliseconds 100 }}",
            quoted(serial)
        );
        s.push_str("if (-not $cd) { throw 'the session brought no CD/DVD drive' }\n$cd.Drive\n");
        return s;
    }
    let _ = writeln!(
        s,
        "$disk = $null; foreach ($i in 1..100) {{ $disk = Get-IscsiSession | Where-Object \
         {{ $_.TargetNodeAddress -eq {} }} | Get-Disk -ErrorAction SilentlyContinue; if ($disk) \
         {{ break }}; Start-Sleep -Milliseconds 100 }}",
        quoted(&l.iqn)
    );
    s.push_str("if (-not $disk) { throw 'the session brought no disk' }\n$disk.Number\n");
    s
}

/// The drive letter the CD-ROM login script printed last (`E:`).
pub fn cdrom_letter(stdout: &str) -> Result<char, ApiError> {
    let last = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("");
    drive_letter(last).map_err(|_| {
        ApiError::new(
            ErrorKind::Io,
            format!(
                "the iSCSI initiator logged in, but no CD/DVD drive letter came back ({:?})",
                stdout.trim()
            ),
        )
    })
}

/// Reads the disk number the login script printed last.
pub fn disk_number(stdout: &str) -> Result<u32, ApiError> {
    stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| {
            ApiError::new(
                ErrorKind::Io,
                format!(
                    "the iSCSI initiator logged in, but no disk number came back ({:?})",
                    stdout.trim()
                ),
            )
        })
}

/// The script that brings disk `n` online, writable unless `read_only`.
pub fn online_script(n: u32, read_only: bool) -> String {
    format!(
        "$ErrorActionPreference = 'Stop'\nSet-Disk -Number {n} -IsOffline $false\n\
         Set-Disk -Number {n} -IsReadOnly ${}\n",
        if read_only { "true" } else { "false" }
    )
}

/// A drive letter as `--mount` gives it (`E`, `E:` or `E:\`), upper case.
pub fn drive_letter(mount: &str) -> Result<char, ApiError> {
    let t = mount.trim_end_matches(['\\', '/']).trim_end_matches(':');
    let mut chars = t.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_alphabetic() => Ok(c.to_ascii_uppercase()),
        _ => Err(ApiError::invalid(format!(
            "--mount {mount}: on Windows a disk is mounted on a drive letter, such as E:"
        ))),
    }
}

/// Windows' name of a file system `--mkfs` names.
pub fn file_system(name: &str) -> Result<&'static str, ApiError> {
    match name.to_ascii_lowercase().as_str() {
        "ntfs" => Ok("NTFS"),
        "exfat" => Ok("exFAT"),
        "fat32" | "vfat" => Ok("FAT32"),
        "refs" => Ok("ReFS"),
        _ => Err(ApiError::invalid(format!(
            "--mkfs {name}: Windows formats ntfs, exfat, fat32 or refs"
        ))),
    }
}

/// The script that makes disk `n` one GPT partition formatted with `fs` (Windows' name),
/// with `letter` or none.
pub fn format_script(n: u32, fs: &str, letter: Option<char>) -> String {
    let place = letter.map_or("-AssignDriveLetter".to_owned(), |c| {
        format!("-DriveLetter {c}")
    });
    format!(
        "$ErrorActionPreference = 'Stop'\nInitialize-Disk -Number {n} -PartitionStyle GPT\n\
         New-Partition -DiskNumber {n} -UseMaximumSize {place} | Format-Volume -FileSystem {fs} \
         -Confirm:$false | Out-Null\n"
    )
}

/// The script that gives the first data partition of disk `n` the drive letter `letter`.
pub fn letter_script(n: u32, letter: char) -> String {
    format!(
        "$ErrorActionPreference = 'Stop'\n$p = Get-Partition -DiskNumber {n} | Where-Object \
         {{ $_.Type -ne 'Reserved' -and $_.Size -gt 0 }} | Select-Object -First 1\n\
         if (-not $p) {{ throw 'the disk has no partition: format it with --mkfs' }}\n\
         $p | Set-Partition -NewDriveLetter {letter}\n"
    )
}

/// The script that logs the session of `iqn` out (Windows flushes the disk first).
pub fn logout_script(iqn: &str) -> String {
    format!(
        "$ErrorActionPreference = 'Stop'\nDisconnect-IscsiTarget -NodeAddress {} -Confirm:$false\n",
        quoted(iqn)
    )
}

/// Windows' path of disk `n`, as `vdk list` shows it.
pub fn device_path(n: u32) -> String {
    format!(r"\\.\PhysicalDrive{n}")
}

/// The disk number in a path of [`device_path`]'s.
pub fn disk_of_path(path: &str) -> Option<u32> {
    path.strip_prefix(r"\\.\PhysicalDrive")?.parse().ok()
}

/// The script that makes Windows read disk `n`'s size again (after it grew); its partition
/// then grows with `Resize-Partition`.
pub fn rescan_script(n: u32) -> String {
    format!("$ErrorActionPreference = 'Stop'\nUpdate-Disk -Number {n}\n")
}

/// A CHAP secret of 16 characters (the most Windows takes) from the system's randomness
/// (std's hasher keys), for a target that has none configured.
pub fn new_secret() -> String {
    use std::hash::{BuildHasher, Hasher};
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut out = String::new();
    while out.len() < 16 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(out.len());
        let mut v = h.finish();
        for _ in 0..8 {
            if out.len() == 16 {
                break;
            }
            out.push(char::from(ALPHABET[usize::try_from(v % 57).unwrap_or(0)]));
            v /= 57;
        }
    }
    out
}

/// Runs `script` in PowerShell; its standard output, or its error in one line.
#[cfg(windows)]
pub fn run(what: &str, script: &str) -> Result<String, ApiError> {
    let out = std::process::Command::new("powershell.exe")
        .args([
            "-NoProfile",
            "-NonInteractive",
            "-ExecutionPolicy",
            "Bypass",
            "-Command",
        ])
        .arg(script)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            ApiError::new(
                ErrorKind::Unsupported,
                format!(
                    "{what}: cannot run powershell.exe ({e}); --attach none serves the disk \
                     without Windows' initiator"
                ),
            )
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("failed");
        return Err(ApiError::new(ErrorKind::Io, format!("{what}: {first}")));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login() -> Login {
        Login {
            iqn: "iqn.2026-11.org.vdk:data-1a2b".into(),
            portal: "127.0.0.1:3260".parse().unwrap(),
            chap: Some(("vdk".into(), "it's-a-secret16".into())),
        }
    }

    #[test]
    fn login_adds_the_portal_once_logs_in_with_chap_and_prints_the_disk() {
        let s = login_script(&login(), None);
        assert!(s.contains(
            "New-IscsiTargetPortal -TargetPortalAddress '127.0.0.1' -TargetPortalPortNumber 3260"
        ));
        assert!(s.contains("if (-not (Get-IscsiTargetPortal"));
        assert!(s.contains("Connect-IscsiTarget -NodeAddress 'iqn.2026-11.org.vdk:data-1a2b'"));
        // Quotes in a secret cannot end the literal.
        assert!(s.contains("-ChapUsername 'vdk' -ChapSecret 'it''s-a-secret16'"));
        assert!(s.trim_end().ends_with("$disk.Number"));
        let open = login_script(
            &Login {
                chap: None,
                ..login()
            },
            None,
        );
        assert!(!open.contains("CHAP"));
        let cd = login_script(&login(), Some("00ab12cd34ef5678"));
        assert!(cd.contains("Win32_CDROMDrive") && cd.contains("-eq '00ab12cd34ef5678'"));
        assert!(cd.trim_end().ends_with("$cd.Drive") && !cd.contains("Get-Disk"));
    }

    #[test]
    fn the_cdrom_letter_is_the_last_line() {
        assert_eq!(cdrom_letter("E:\r\n").unwrap(), 'E');
        assert!(cdrom_letter("").is_err());
    }

    #[test]
    fn the_disk_number_is_the_last_line() {
        assert_eq!(disk_number("WARNING: x\r\n3\r\n\r\n").unwrap(), 3);
        assert!(disk_number("").is_err());
        assert!(disk_number("no disk\n").is_err());
    }

    #[test]
    fn letters_and_file_systems_are_checked() {
        for ok in ["e", "E:", "E:\\", "e:/"] {
            assert_eq!(drive_letter(ok).unwrap(), 'E');
        }
        for bad in ["", "EF:", "/mnt/data", "1:"] {
            assert!(drive_letter(bad).is_err(), "{bad}");
        }
        assert_eq!(file_system("NTFS").unwrap(), "NTFS");
        assert_eq!(file_system("exfat").unwrap(), "exFAT");
        assert_eq!(file_system("vfat").unwrap(), "FAT32");
        assert!(file_system("ext4").unwrap_err().message.contains("ntfs"));
    }

    #[test]
    fn online_format_letter_and_logout_scripts() {
        assert!(online_script(3, false).contains("Set-Disk -Number 3 -IsReadOnly $false"));
        assert!(online_script(3, true).contains("-IsReadOnly $true"));
        let f = format_script(3, "NTFS", Some('E'));
        assert!(f.contains("Initialize-Disk -Number 3 -PartitionStyle GPT"));
        assert!(f.contains("New-Partition -DiskNumber 3 -UseMaximumSize -DriveLetter E"));
        assert!(f.contains("Format-Volume -FileSystem NTFS -Confirm:$false"));
        assert!(format_script(3, "exFAT", None).contains("-AssignDriveLetter"));
        assert!(letter_script(3, 'F').contains("Set-Partition -NewDriveLetter F"));
        assert!(logout_script("iqn.x:y")
            .contains("Disconnect-IscsiTarget -NodeAddress 'iqn.x:y' -Confirm:$false"));
        assert_eq!(device_path(3), r"\\.\PhysicalDrive3");
        assert_eq!(disk_of_path(&device_path(3)), Some(3));
        assert_eq!(disk_of_path("E:\\"), None);
        assert!(rescan_script(3).contains("Update-Disk -Number 3"));
    }

    #[test]
    fn secrets_are_sixteen_characters_and_differ() {
        let (a, b) = (new_secret(), new_secret());
        assert_eq!(a.len(), 16);
        assert!(a.len() >= vdk_iscsi::chap::MIN_SECRET);
        assert_ne!(a, b);
    }
}
