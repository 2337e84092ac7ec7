//! The parts of the `vdk` binary that other programs may use: the control API's messages and
//! client ([`control`]), and how errors are worded ([`message`]). The binary itself
//! (commands, daemon) is `src/main.rs`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod control;
pub mod message;
