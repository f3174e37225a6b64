//! Machine models (microvm) with memory maps, onboard devices and kernel boot.

#![deny(missing_docs)]
