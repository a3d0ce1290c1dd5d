//! The C boundary: every `extern "C"` function, the `#[repr(C)]` types and
//! TF_* constants, pointer checks, the panic guard and tf_last_error.
//!
//! Every exported body is `guard(...)` or `guard_value(...)`: nothing unwinds
//! into C, and a failure leaves its message for tf_last_error() on the
//! calling thread. tests/ffi_guard.rs checks that no function skips it.

#![allow(non_camel_case_types)]
// The safety contract of every exported function is the C one, stated once
// here rather than in a Rust-only section the header would not show: each
// pointer argument is NULL or points to a live object of its type (for
// tf_server / tf_config: one this library returned and that is not freed).
#![allow(clippy::missing_safety_doc)]

mod batch;
mod config;
mod conn;
mod pull;
mod server;

pub use batch::*;
pub use config::*;
pub use conn::*;
pub use pull::*;
pub use server::*;

use crate::config::LogLevel;
use crate::conn::CloseReason;
use crate::error::{Code, Error, Result};
use once_cell::sync::Lazy;
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Success.
pub const TF_OK: i32 = 0;
/// A NULL pointer, an out-of-range value or an unparsable address.
pub const TF_ERR_INVALID: i32 = 1;
/// The connection id is unknown or the connection is already closed.
pub const TF_ERR_NO_CONN: i32 = 2;
/// Queued output for that connection would exceed its limit; nothing was queued.
pub const TF_ERR_FULL: i32 = 3;
/// The payload is longer than the configured max frame.
pub const TF_ERR_TOO_LARGE: i32 = 4;
/// The server is stopped or stopping.
pub const TF_ERR_STOPPED: i32 = 5;
/// An operating-system error (bind, listen, thread spawn...); see tf_last_error().
pub const TF_ERR_IO: i32 = 6;
/// A bug was caught at the boundary (for example a Rust panic); never a crash.
pub const TF_ERR_INTERNAL: i32 = 7;

/// on_close reason: the peer closed or reset the connection.
pub const TF_CLOSE_PEER: i32 = 0;
/// on_close reason: tf_conn_close() was called.
pub const TF_CLOSE_LOCAL: i32 = 1;
/// on_close reason: the server is stopping.
pub const TF_CLOSE_SHUTDOWN: i32 = 2;
/// on_close reason: a socket error.
pub const TF_CLOSE_IO: i32 = 3;
/// on_close reason: the peer announced a frame longer than max frame.
pub const TF_CLOSE_TOO_LARGE: i32 = 4;
/// on_close reason: no complete frame was received within the idle timeout.
pub const TF_CLOSE_IDLE: i32 = 5;
/// on_close reason: the peer broke the framing rules (an impossible length)
/// or sent a bad PROXY header.
pub const TF_CLOSE_PROTOCOL: i32 = 6;
/// on_close reason: an outbound connection (tf_connect) could not be
/// established (refused, unreachable, no answer within the connect timeout).
pub const TF_CLOSE_CONNECT_FAILED: i32 = 7;
/// on_close reason: queued output stayed above the slow-consumer limit too
/// long (tf_config_set_slow_consumer()).
pub const TF_CLOSE_SLOW: i32 = 8;
/// on_close reason: memory for this connection could not be had: the
/// partial-frame budget (tf_config_set_max_buffered()) was full and it held
/// the most, or an allocation failed.
pub const TF_CLOSE_OVERLOAD: i32 = 9;

/// Backend: epoll on Linux, poll(2) elsewhere (the default).
pub const TF_BACKEND_AUTO: i32 = 0;
/// Backend: poll(2), everywhere.
pub const TF_BACKEND_POLL: i32 = 1;
/// Backend: epoll, Linux only.
pub const TF_BACKEND_EPOLL: i32 = 2;

/// Log level of a library diagnostic.
pub const TF_LOG_ERROR: i32 = 1;
pub const TF_LOG_WARN: i32 = 2;
pub const TF_LOG_INFO: i32 = 3;
pub const TF_LOG_DEBUG: i32 = 4;

/// Identifies one connection: never 0, unique within a server, never reused.
#[allow(non_camel_case_types)]
pub type tf_conn_id = u64;

const _: () = {
    assert!(Code::Invalid as i32 == TF_ERR_INVALID);
    assert!(Code::NoConn as i32 == TF_ERR_NO_CONN);
    assert!(Code::Full as i32 == TF_ERR_FULL);
    assert!(Code::TooLarge as i32 == TF_ERR_TOO_LARGE);
    assert!(Code::Stopped as i32 == TF_ERR_STOPPED);
    assert!(Code::Io as i32 == TF_ERR_IO);
    assert!(Code::Internal as i32 == TF_ERR_INTERNAL);
    assert!(CloseReason::Peer as i32 == TF_CLOSE_PEER);
    assert!(CloseReason::Local as i32 == TF_CLOSE_LOCAL);
    assert!(CloseReason::Shutdown as i32 == TF_CLOSE_SHUTDOWN);
    assert!(CloseReason::Io as i32 == TF_CLOSE_IO);
    assert!(CloseReason::TooLarge as i32 == TF_CLOSE_TOO_LARGE);
    assert!(CloseReason::Idle as i32 == TF_CLOSE_IDLE);
    assert!(CloseReason::Overload as i32 == TF_CLOSE_OVERLOAD);
    assert!(CloseReason::Slow as i32 == TF_CLOSE_SLOW);
    assert!(CloseReason::Protocol as i32 == TF_CLOSE_PROTOCOL);
    assert!(CloseReason::ConnectFailed as i32 == TF_CLOSE_CONNECT_FAILED);
    assert!(LogLevel::Error as i32 == TF_LOG_ERROR && LogLevel::Debug as i32 == TF_LOG_DEBUG);
};

thread_local! {
    /// A fixed buffer, not a CString: the pointer tf_last_error() returns
    /// stays valid for the thread's whole life (a later failure rewrites the
    /// text in place, never frees it), and the buffer has no destructor, so
    /// it still works from thread-exit destructors.
    static LAST_ERROR: RefCell<[u8; LAST_ERROR_LEN]> = const { RefCell::new([0; LAST_ERROR_LEN]) };
}

/// Longest tf_last_error() message, NUL included.
const LAST_ERROR_LEN: usize = 1024;

static VERSION: Lazy<CString> =
    Lazy::new(|| CString::new(env!("CARGO_PKG_VERSION")).expect("version has no NUL"));

/// Records the message for tf_last_error(). From a thread-exit destructor
/// the thread-local may already be gone: the message is then dropped (the
/// code is still returned), never a panic.
fn set_last_error(message: &str) {
    let _ = LAST_ERROR.try_with(|e| {
        if let Ok(mut buf) = e.try_borrow_mut() {
            // Truncated at a character boundary; NULs inside become spaces.
            let mut end = message.len().min(LAST_ERROR_LEN - 1);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            for (dst, &b) in buf.iter_mut().zip(&message.as_bytes()[..end]) {
                *dst = if b == 0 { b' ' } else { b };
            }
            buf[end] = 0;
        }
    });
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

/// The body of every exported function that returns a TF_* code: the
/// closure's error becomes its code, a panic becomes TF_ERR_INTERNAL, and
/// either leaves a message for tf_last_error().
pub(crate) fn guard(f: impl FnOnce() -> Result<()>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => TF_OK,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.code as i32
        }
        Err(panic) => {
            set_last_error(&format!(
                "internal error (a bug in tcpframe was caught): {}",
                panic_message(&*panic)
            ));
            TF_ERR_INTERNAL
        }
    }
}

/// The body of every exported function that returns something else (a
/// port, a descriptor, a pointer): on error or panic, the message is
/// recorded and `fallback` is returned.
pub(crate) fn guard_or<T>(fallback: T, f: impl FnOnce() -> Result<T>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            fallback
        }
        Err(panic) => {
            set_last_error(&format!(
                "internal error (a bug in tcpframe was caught): {}",
                panic_message(&*panic)
            ));
            fallback
        }
    }
}

/// Borrows `*p`, or fails with TF_ERR_INVALID naming the argument.
///
/// # Safety
/// `p` is NULL or points to a live, properly aligned `T` for `'a`.
pub(crate) unsafe fn arg_ref<'a, T>(p: *const T, what: &str) -> Result<&'a T> {
    // SAFETY: the caller guarantees p is NULL or valid for 'a.
    unsafe { p.as_ref() }.ok_or_else(|| Error::invalid(format!("{what} is NULL")))
}

/// Mutable version of `arg_ref`.
///
/// # Safety
/// `p` is NULL or points to a live `T` that nothing else uses during `'a`.
pub(crate) unsafe fn arg_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T> {
    // SAFETY: the caller guarantees p is NULL or valid and unaliased for 'a.
    unsafe { p.as_mut() }.ok_or_else(|| Error::invalid(format!("{what} is NULL")))
}

/// Checks an output pointer, which may point to uninitialized memory: write
/// through it with `ptr::write`, never through a reference.
pub(crate) fn arg_out<T>(p: *mut T, what: &str) -> Result<*mut T> {
    if p.is_null() {
        Err(Error::invalid(format!("{what} is NULL")))
    } else {
        Ok(p)
    }
}

/// Reads a NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that lives for `'a`.
pub(crate) unsafe fn arg_str<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| Error::invalid(format!("{what} is not UTF-8")))
}

/// Borrows `len` bytes at `p`; NULL is allowed only when `len` is 0.
///
/// # Safety
/// When `len > 0`, `p` points to `len` readable bytes that live for `'a`.
pub(crate) unsafe fn arg_bytes<'a>(p: *const u8, len: usize, what: &str) -> Result<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::invalid(format!("{what} is NULL but its length is {len}")));
    }
    if len > isize::MAX as usize {
        return Err(Error::invalid(format!("{what} length {len} is out of range")));
    }
    // SAFETY: non-NULL, `len` readable bytes by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// A frame's payload, as arg_bytes, except that a length past any slice
/// (above PTRDIFF_MAX, e.g. a negative length cast to size_t) is what it is
/// for tf_send: longer than max frame, TF_ERR_TOO_LARGE.
///
/// # Safety
/// As arg_bytes.
pub(crate) unsafe fn frame_bytes<'a>(p: *const u8, len: usize, what: &str) -> Result<&'a [u8]> {
    if len > isize::MAX as usize && !p.is_null() {
        return Err(Error::new(
            crate::error::Code::TooLarge,
            format!("{what} length {len} is larger than any frame"),
        ));
    }
    // SAFETY: the caller's contract, passed on.
    unsafe { arg_bytes(p, len, what) }
}

/// The message of the last failed call on the calling thread; "" if none.
///
/// **Thread:** any thread; each thread has its own message.
/// **Ownership:** the library owns the string; never free it. Its text
/// stays until the next failing tcpframe call on the same thread rewrites
/// it (read it after the call that failed); the pointer itself stays valid
/// for the thread's whole life. At most 1023 bytes. Never NULL.
#[no_mangle]
pub extern "C" fn tf_last_error() -> *const c_char {
    guard_or(c"".as_ptr(), || {
        // The CString's buffer stays put until the next failing call on this
        // thread replaces it; "" once the thread-local is gone.
        Ok(LAST_ERROR.try_with(|e| e.as_ptr() as *const c_char).unwrap_or(c"".as_ptr()))
    })
}

/// The library version, such as "0.1.0".
///
/// **Thread:** any thread.
/// **Ownership:** a static string; never free it. Never NULL.
#[no_mangle]
pub extern "C" fn tf_version() -> *const c_char {
    guard_or(c"".as_ptr(), || Ok(VERSION.as_ptr()))
}
