//! The QMP protocol as QEMU speaks it: streaming parser, phase-checked command registry, events, servers.

#![deny(missing_docs)]
