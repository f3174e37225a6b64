//! Machine lifecycle phases, run states, phase sets and machine-init-done notifiers.

#![deny(missing_docs)]
