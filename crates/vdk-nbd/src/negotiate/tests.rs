use std::io::Cursor as IoCursor;

use vdk_backends::MemoryDisk;

use super::*;
use crate::proto::tflags;

/// A stream that reads scripted client bytes and records what the server writes.
struct Duplex {
    input: IoCursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn client(options: &[(u32, Vec<u8>)]) -> Duplex {
    let mut input = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    for (option, data) in options {
        input.extend_from_slice(&IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&option.to_be_bytes());
        input.extend_from_slice(&(data.len() as u32).to_be_bytes());
        input.extend_from_slice(data);
    }
    Duplex {
        input: IoCursor::new(input),
        output: Vec::new(),
    }
}

fn exports() -> Vec<Arc<Export>> {
    vec![Arc::new(Export::new(
        "ram",
        Arc::new(MemoryDisk::new(1 << 20)),
    ))]
}

fn name_and_infos(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

fn meta_query(export: &str, query: &str) -> Vec<u8> {
    meta_queries(export, &[query])
}

fn meta_queries(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// The (id, name) of each META_CONTEXT reply the server sent.
fn contexts_replied(out: &[u8]) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let mut at = 18;
    while at + 20 <= out.len() {
        let kind = u32::from_be_bytes(out[at + 12..at + 16].try_into().unwrap());
        let len = u32::from_be_bytes(out[at + 16..at + 20].try_into().unwrap()) as usize;
        if kind == rep::META_CONTEXT {
            let d = &out[at + 20..at + 20 + len];
            let id = u32::from_be_bytes(d[..4].try_into().unwrap());
            found.push((id, String::from_utf8(d[4..].to_vec()).unwrap()));
        }
        at += 20 + len;
    }
    found
}

/// The reply types the server sent, in order, after the 18-byte greeting.
fn reply_types(out: &[u8]) -> Vec<u32> {
    let mut types = Vec::new();
    let mut at = 18;
    while at + 20 <= out.len() {
        types.push(u32::from_be_bytes(
            out[at + 12..at + 16].try_into().unwrap(),
        ));
        let len = u32::from_be_bytes(out[at + 16..at + 20].try_into().unwrap()) as usize;
        at += 20 + len;
    }
    types
}

#[test]
fn go_to_default_export_enters_transmission() {
    let mut s = client(&[(opt::GO, name_and_infos(""))]);
    let n = negotiate(&mut s, &exports()).unwrap();
    assert_eq!(n.export.name, "ram");
    assert_eq!(reply_types(&s.output), vec![rep::INFO, rep::INFO, rep::ACK]);
}

#[test]
fn info_for_unknown_export_is_err_unknown_and_haggling_goes_on() {
    let mut s = client(&[
        (opt::INFO, name_and_infos("nope")),
        (opt::GO, name_and_infos("ram")),
    ]);
    let n = negotiate(&mut s, &exports()).unwrap();
    assert_eq!(n.export.name, "ram");
    assert_eq!(reply_types(&s.output)[0], rep::ERR_UNKNOWN);
}

#[test]
fn set_meta_context_without_structured_replies_is_invalid() {
    let mut s = client(&[(opt::SET_META_CONTEXT, meta_query("ram", BASE_ALLOCATION))]);
    assert!(matches!(
        negotiate(&mut s, &exports()),
        Err(HandshakeError::Ended)
    ));
    assert_eq!(reply_types(&s.output), vec![rep::ERR_INVALID]);
}

#[test]
fn structured_go_selects_base_allocation_and_advertises_df() {
    let mut s = client(&[
        (opt::STRUCTURED_REPLY, vec![]),
        (opt::SET_META_CONTEXT, meta_query("ram", BASE_ALLOCATION)),
        (opt::GO, name_and_infos("ram")),
    ]);
    let n = negotiate(&mut s, &exports()).unwrap();
    assert!(n.structured && matches!(n.contexts[..], [Context::Allocation]));
    assert_ne!(n.flags & tflags::SEND_DF, 0);
}

#[test]
fn context_set_for_another_export_is_not_selected() {
    let two = vec![
        Arc::new(Export::new("a", Arc::new(MemoryDisk::new(1 << 20)))),
        Arc::new(Export::new("b", Arc::new(MemoryDisk::new(1 << 20)))),
    ];
    let mut s = client(&[
        (opt::STRUCTURED_REPLY, vec![]),
        (opt::SET_META_CONTEXT, meta_query("a", BASE_ALLOCATION)),
        (opt::GO, name_and_infos("b")),
    ]);
    assert!(negotiate(&mut s, &two).unwrap().contexts.is_empty());
}

#[test]
fn unknown_option_is_err_unsup() {
    let mut s = client(&[(999, vec![1, 2, 3])]);
    assert!(matches!(
        negotiate(&mut s, &exports()),
        Err(HandshakeError::Ended)
    ));
    assert_eq!(reply_types(&s.output), vec![rep::ERR_UNSUP]);
}

#[test]
fn oversized_option_is_skipped_with_err_too_big() {
    let mut s = client(&[(opt::LIST, vec![0; (MAX_OPTION_DATA + 1) as usize])]);
    assert!(matches!(
        negotiate(&mut s, &exports()),
        Err(HandshakeError::Ended)
    ));
    assert_eq!(reply_types(&s.output), vec![rep::ERR_TOO_BIG]);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let mut s = client(&[]);
    s.input.get_mut()[0] = 0x80;
    assert!(matches!(
        negotiate(&mut s, &exports()),
        Err(HandshakeError::Protocol(_))
    ));
}

#[test]
fn dirty_bitmaps_are_listed_by_namespace_and_selected_by_name_with_ids_in_order() {
    use vdk_core::bitmap::{Bitmaps, DirtyBitmap};
    let bitmaps = Arc::new(Bitmaps::default());
    for name in ["daily", "weekly"] {
        bitmaps
            .add(name, DirtyBitmap::new(1 << 20, 65536).unwrap())
            .unwrap();
    }
    let mut export = Export::new("ram", Arc::new(MemoryDisk::new(1 << 20)));
    export.bitmaps = Some(bitmaps);
    let exports = vec![Arc::new(export)];
    let mut s = client(&[
        (opt::STRUCTURED_REPLY, vec![]),
        (opt::LIST_META_CONTEXT, meta_queries("ram", &[])),
        (opt::LIST_META_CONTEXT, meta_query("ram", "qemu:")),
        (
            opt::LIST_META_CONTEXT,
            meta_query("ram", "qemu:dirty-bitmap:"),
        ),
        // SET takes whole names only; an unknown one is left out.
        (
            opt::SET_META_CONTEXT,
            meta_queries(
                "ram",
                &[
                    "qemu:dirty-bitmap:",
                    "qemu:dirty-bitmap:weekly",
                    "base:allocation",
                    "x:y",
                ],
            ),
        ),
        (opt::GO, name_and_infos("ram")),
    ]);
    let n = negotiate(&mut s, &exports).unwrap();
    let all = |id| {
        vec![
            (id, "base:allocation".to_owned()),
            (id, "qemu:dirty-bitmap:daily".to_owned()),
            (id, "qemu:dirty-bitmap:weekly".to_owned()),
        ]
    };
    let mut want = all(0);
    want.extend(all(0)[1..].to_vec());
    want.extend(all(0)[1..].to_vec());
    // SET answers in the export's order: base:allocation (1), then weekly (2).
    want.push((1, "base:allocation".into()));
    want.push((2, "qemu:dirty-bitmap:weekly".into()));
    assert_eq!(contexts_replied(&s.output), want);
    assert!(matches!(
        n.contexts[..],
        [Context::Allocation, Context::DirtyBitmap(_)]
    ));
}
