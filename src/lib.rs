//! tcpframe: a hardened TCP server for length-prefixed messages, with a C
//! ABI and no async runtime. See README.md and include/tcpframe.h.
//!
//! Layers, dependencies pointing down: `ffi` (the C boundary) -> `server`
//! (host-thread side) -> `event_loop` -> `conn` / `frame` -> `sys` (the OS).

#![deny(unsafe_op_in_unsafe_fn)]

pub mod addr;
pub mod config;
pub mod conn;
pub mod error;
pub mod event_loop;
pub mod ffi;
pub mod frame;
pub mod outq;
pub mod proxy;
pub mod pull;
pub mod server;
pub mod shared;
pub mod sys;
