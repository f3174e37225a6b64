//! Keel assembled: the embedding API behind the `vmm` binary.

#![deny(missing_docs)]
