//! Interpreting x86 backend (tcg) for the keel accelerator seam.

#![deny(missing_docs)]
pub mod platform;
