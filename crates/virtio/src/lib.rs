//! virtio-mmio transport (version 2) and the virtio devices Linux guests use.

#![deny(missing_docs)]
