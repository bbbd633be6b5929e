//! TLS 1.3 with mutual authentication on every channel (rustls with the `ring` provider).
//!
//! Every connection, main and data, is wrapped right after the socket is connected or
//! accepted: the TLS handshake runs there, bounded by the connect or handshake timeout, and
//! both sides must present a certificate signed by the CA in the CA file. The source checks
//! the destination's certificate against the host it connects to (`tcp:HOST:PORT`) or the
//! name given with [`TlsConfig::with_server_name`] (required for `unix:` addresses).
//!
//! The engine shares each socket between threads (the source's return path reads the main
//! channel while the coordinator writes it), keeps clones to `shutdown()` it and wake blocked
//! threads, reads pages into guest memory with `readv` on the raw descriptor, and finds dead
//! peers with socket timeouts. None of that can go through a rustls connection object, and
//! this kernel has no kTLS to hand one to. So once the handshake is done, one thread per
//! connection (`lm-tls`, the *pump*) owns the rustls connection and the network socket and
//! bridges them to one end of a `UnixStream::pair()`; the engine gets the other end as
//! [`Stream::Tls`](crate::transport::Stream::Tls), plaintext, and everything it does to a socket works on it unchanged.
//!
//! The pump never buffers without bound: it reads from one side only when what it read
//! before has gone out on the other (at most 128 KiB each way, plus rustls' own records), so
//! a peer that stops reading stops the engine's writes as a plain socket would, and the
//! engine's send timeout fires. Ends travel both ways: the engine closing its end sends
//! `close_notify` after everything it wrote; the peer's `close_notify` (or its socket's end)
//! becomes an end of stream for the engine after everything it sent. A TLS failure (a bad
//! record, an alert such as the destination refusing this side's certificate) is kept, and
//! the engine's next read or write on the stream returns it instead of a bare end of stream.
//! The last clone of the stream to go shuts the pair down and joins the pump, so no `lm-tls`
//! thread outlives its stream.

//!
//! # Layout, and the layers
//!
//! - `config`: [`TlsConfig`], the certificates and keys and the rustls configurations
//!   built from them.
//! - `error`: [`TlsError`] and [`TlsFile`], and rustls' errors as a person should read
//!   them.
//! - `handshake`: the TLS handshake on a just connected or accepted socket, bounded by a
//!   deadline and a cancel token.
//! - `net`: [`NetSocket`], the plain socket under a TLS connection.
//! - `stream`: [`TlsStream`], the engine's plaintext end, and its `lm-tls` thread
//!   (`pump`).
//!
//! The byte streams (`transport::Stream`, plain or TLS) are the lowest layer and know
//! nothing of livemig's frames: [`TlsStream`] and its pump use only the socket under them.
//! The one place TLS meets livemig's frames is a peer that speaks plain livemig where TLS
//! was expected; the handshake then hands the socket to a `PlainPeer` it is given, and
//! the framing layer above supplies that (`framed`'s `TlsConfig::connect` and
//! `TlsConfig::accept`, the entry points the source and destination call).

mod config;
mod error;
mod handshake;
mod net;
mod pump;
mod stream;
mod sys;

pub use config::TlsConfig;
pub use error::{TlsError, TlsFile};
pub(crate) use handshake::PlainPeer;
pub use net::NetSocket;
pub use stream::TlsStream;
