//! Error messages as users read them: one line, each thing said once. An error passes
//! through several layers that each add what they know ("cannot open IMAGE", then the image
//! layer's "IMAGE: ...", then the system's "No such file or directory (os error 2)"); this
//! joins them as `{:#}` does, minus the repeats and the errno tails.

/// Joins the causes of an error, outermost first, with ": ", dropping what was said already:
/// a leading `PATH: ` that an outer part named, a part said whole before, and the
/// " (os error N)" that the standard library appends to system errors.
pub fn one_line(causes: impl IntoIterator<Item = String>) -> String {
    let mut out = String::new();
    for cause in causes {
        let mut part = strip_os_error(&cause);
        // "PATH: rest" where PATH (a file name or URL) was said: keep "rest".
        while let Some((head, rest)) = part.split_once(": ") {
            let names_a_file = !head.contains(' ') && (head.contains('/') || head.contains('.'));
            if names_a_file && out.contains(head) {
                part = rest.to_owned();
            } else {
                break;
            }
        }
        let part = part.trim();
        if part.is_empty() || out.contains(part) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(part);
    }
    out
}

/// `text` without the " (os error N)" tails of `io::Error`'s display.
pub fn strip_os_error(text: &str) -> String {
    const TAIL: &str = " (os error ";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(TAIL) {
        let after = &rest[at + TAIL.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && after[digits..].starts_with(')') {
            out.push_str(&rest[..at]);
            rest = &after[digits + 1..];
        } else {
            out.push_str(&rest[..at + TAIL.len()]);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn os_error_tails_are_dropped() {
        assert_eq!(
            strip_os_error("File too large (os error 27)"),
            "File too large"
        );
        assert_eq!(strip_os_error("a (os error x) b"), "a (os error x) b");
    }

    #[test]
    fn a_path_said_by_the_context_is_not_repeated() {
        let msg = one_line(parts(&[
            "cannot open /srv/a.img",
            "/srv/a.img: No such file or directory (os error 2)",
        ]));
        assert_eq!(msg, "cannot open /srv/a.img: No such file or directory");
    }

    #[test]
    fn a_part_said_whole_before_is_dropped() {
        let msg = one_line(parts(&["x.img is in use", "x.img is in use"]));
        assert_eq!(msg, "x.img is in use");
    }

    #[test]
    fn a_relative_file_name_said_before_is_not_repeated() {
        let msg = one_line(parts(&["cannot discard ov.qcow2", "ov.qcow2: no base"]));
        assert_eq!(msg, "cannot discard ov.qcow2: no base");
    }

    #[test]
    fn words_that_are_not_paths_are_kept() {
        let msg = one_line(parts(&["commit failed", "failed: disk full"]));
        assert_eq!(msg, "commit failed: failed: disk full");
    }
}
