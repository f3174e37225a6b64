//! The QMP protocol as QEMU speaks it, for any VMM.
//!
//! * [`json`]: the streaming parser (single-quoted strings, one error per malformed input
//!   and resynchronisation, bounded messages) and QEMU-style ASCII output.
//! * [`Registry`]: commands declared as Rust types with typed arguments, a result type
//!   and the lifecycle phases where they are valid; dispatch enforces the phases
//!   (`OutOfPhase`) and validates arguments with QEMU's messages; `query-commands` and
//!   `query-qmp-schema` come from the same declarations.
//! * [`Session`]: greeting, capabilities negotiation (`oob` where offered), request checks,
//!   `id` echo, replies; `exec-oob` requests run only for commands declared
//!   [`Command::ALLOW_OOB`].
//! * [`EventBus`]: timestamped events to every negotiated client.
//! * [`server`]: unix/TCP/stdio transports, many clients per listening socket, all served
//!   by one event-loop thread; per event bus (per VMM), one executor thread runs in-band requests
//!   (round robin over clients) and one runs `exec-oob` requests, which never wait for
//!   in-band work. Every buffer has a budget per client and per monitor; a client over
//!   one is disconnected with a logged reason. While the guest runs, the in-band executor
//!   keeps the QMP threads within a share of one CPU ([`pace`]).
//!
//! The crate knows nothing about machines: a VMM implements [`Dispatcher`] (usually on
//! top of a [`Registry`] of its own context type) and registers its command handlers.

#![deny(missing_docs)]

mod error;
pub mod events;
mod evloop;
pub mod json;
pub mod pace;
pub mod passfd;
mod registry;
pub mod schema;
pub mod server;
mod session;

pub use error::{CommandError, ErrorClass};
pub use events::{Event, EventBus};
pub use registry::{
    Command, CommandInfo, ContextFree, Handler, PhaseSource, Registry, capabilities_arguments,
    executing_out_of_band, run_out_of_band,
};
pub use schema::{Builtin, Member, Type};
pub use server::{Endpoint, Monitor, ServerError, bind_unix_0600, serve, serve_stream};
pub use session::{Dispatcher, Message, REQ_QUEUE_LEN_MAX, Session, reply_error, respond_command};
