//! KVM backend for the keel accelerator seam.

#![deny(missing_docs)]
