//! The NBD server: fixed newstyle handshake ([`handshake`]), a pipelined
//! transmission loop that serves many requests concurrently
//! ([`transmission`]), and the listeners for unix sockets, TCP and sockets
//! handed over already connected ([`server`]), and per-command counters
//! ([`stats`]).

pub mod export;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod stats;
pub mod transmission;

pub use export::{Export, Limits};
pub use server::Server;
pub use stats::{NbdCounters, NbdStats};
