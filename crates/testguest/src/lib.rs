//! Test guests generated in code for differential and integration tests.

#![deny(missing_docs)]
