//! # livemig-qmp
//!
//! A server for the QEMU Machine Protocol (QMP), so that scripts, libvirt-style tools and
//! Python's `qemu.qmp` drive livemig as they drive QEMU.
//!
//! - [`split`]: finds each JSON object in the byte stream (clients need not send newlines).
//! - [`json`]: JSON as QMP reads it (a duplicate key is an error).
//! - [`message`]: parses a request, writes replies, errors, events and the greeting.
//! - [`args`]: reads a command's arguments with QMP's wording for mistakes.
//! - [`server`]: the Unix socket, client slots, events to negotiated clients.
//! - `conn`: one client: its reader, and its writer draining a bounded queue.
//! - [`unix_path`]: what may be replaced at the socket's path, and removed after.
//! - [`client`]: a small blocking client (`livemig status`, tests).
//!
//! What the commands do is not here: the VMM implements [`Handler`]. `docs/qmp.md` in the
//! repository lists the commands livemig serves and where they differ from QEMU.

pub mod args;
pub mod client;
mod conn;
pub mod json;
pub mod message;
pub mod server;
pub mod split;
pub use livemig_sockpath as unix_path;

pub use args::Args;
pub use client::{Client, ClientError};
pub use message::{parse_request, ErrorClass, QmpError, Request};
pub use server::{Events, Handler, Server, ServerConfig, ServerError};
