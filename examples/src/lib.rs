//! Examples live in this directory as Cargo examples; see README.md.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
