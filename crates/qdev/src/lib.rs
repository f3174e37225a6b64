//! A qdev-like device model: typed properties, buses, cold and hot plug, unplug requests.

#![deny(missing_docs)]
