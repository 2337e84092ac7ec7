//! Examples live in this directory as Cargo examples; see README.md.
