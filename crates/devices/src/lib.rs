//! Device register machines: serial, i8042, isa-debug-exit, RTC, virtio.

#![deny(missing_docs)]
