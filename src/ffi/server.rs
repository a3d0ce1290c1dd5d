//! tf_server in callback mode: start, port, send, close, stats, stop, free.

use super::{arg_ref, frame_bytes, guard, guard_or, tf_config, tf_conn_id};
use crate::config::Config;
use crate::conn::CloseReason;
use crate::error::{Error, Result};
use crate::event_loop::Handler;
use crate::pull::PullHost;
use crate::server::{Freed, Server};
use std::ffi::{c_char, c_int, c_void};
use std::time::Duration;

/// Opaque running server. Create with tf_server_start() or
/// tf_server_start_pull(); stop with tf_server_stop(); free with
/// tf_server_free().
pub struct tf_server {
    pub(crate) inner: Server,
    pub(crate) pull: Option<PullHost>,
}

/// The host's callbacks. All of them run on the server's loop thread, one
/// at a time, never concurrently. Callbacks must return normally: a C++
/// exception or a longjmp out of a callback is undefined behaviour (it
/// would cross the library's frames); catch inside the callback.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct tf_callbacks {
    /// Passed back, untouched, as the first argument of every callback.
    pub user_data: *mut c_void,
    /// Optional (NULL: accept all). `peer` is text such as "127.0.0.1:50412"
    /// or "[::1]:50412", valid during the call only. Return 0 to accept;
    /// non-zero refuses: the connection is closed at once, counted in
    /// connections_rejected, and no other callback names it.
    pub on_connect:
        Option<unsafe extern "C" fn(user_data: *mut c_void, conn: tf_conn_id, peer: *const c_char) -> c_int>,
    /// Required. One call per complete inbound frame. `data` is valid during
    /// the call only (copy what you keep); it may be NULL when len is 0.
    pub on_message:
        Option<unsafe extern "C" fn(user_data: *mut c_void, conn: tf_conn_id, data: *const u8, len: usize)>,
    /// Optional. Exactly once for every accepted connection; after it no
    /// callback names that connection again. `reason` is a TF_CLOSE_* value.
    pub on_close: Option<unsafe extern "C" fn(user_data: *mut c_void, conn: tf_conn_id, reason: i32)>,
}

/// Counters of one server (tf_server_stats()).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct tf_stats {
    pub connections_active: u64,
    /// Total ever accepted (on_connect said yes).
    pub connections_accepted: u64,
    /// Over max connections, refused by on_connect, or dropped for lack of descriptors.
    pub connections_rejected: u64,
    pub frames_received: u64,
    /// Frames fully written to their socket.
    pub frames_sent: u64,
    /// Every byte read from sockets, prefixes included.
    pub bytes_received: u64,
    /// Every byte written to sockets, prefixes included.
    pub bytes_sent: u64,
    pub closed_too_large: u64,
    pub closed_idle: u64,
}

/// Calls the host's C functions.
struct Callbacks {
    cb: tf_callbacks,
    peer: Vec<u8>,
    /// Set: frames are held in `batch` and delivered in arrays.
    batch: Option<super::batch::Batch>,
    on_writable: Option<unsafe extern "C" fn(*mut c_void, u64)>,
}

// SAFETY: tf_server_start's contract: the callbacks and user_data may be
// used from the loop thread. The library calls them from that thread only.
unsafe impl Send for Callbacks {}

impl Handler for Callbacks {
    fn on_connect(&mut self, conn: u64, peer: &str) -> bool {
        let Some(f) = self.cb.on_connect else { return true };
        self.peer.clear();
        self.peer.extend_from_slice(peer.as_bytes());
        self.peer.push(0);
        // SAFETY: the host's function, with a NUL-terminated string that
        // lives until it returns.
        unsafe { f(self.cb.user_data, conn, self.peer.as_ptr() as *const c_char) == 0 }
    }

    #[inline]
    fn on_message(&mut self, conn: u64, data: &[u8]) -> bool {
        if let Some(batch) = &mut self.batch {
            return batch.hold(self.cb.user_data, conn, data);
        }
        if let Some(f) = self.cb.on_message {
            let ptr = if data.is_empty() { std::ptr::null() } else { data.as_ptr() };
            // SAFETY: the host's function, with `len` readable bytes at `ptr`
            // that live until it returns.
            unsafe { f(self.cb.user_data, conn, ptr, data.len()) }
        }
        true
    }

    fn on_writable(&mut self, conn: u64) {
        if let Some(f) = self.on_writable {
            // SAFETY: the host's function, called with plain values.
            unsafe { f(self.cb.user_data, conn) }
        }
    }

    fn end_of_reads(&mut self, deliver: bool) {
        if let Some(batch) = &mut self.batch {
            batch.deliver(self.cb.user_data, deliver);
        }
    }

    fn on_close(&mut self, conn: u64, reason: CloseReason) {
        if let Some(f) = self.cb.on_close {
            // SAFETY: the host's function, called with plain values.
            unsafe { f(self.cb.user_data, conn, reason as i32) }
        }
    }
}

/// # Safety
/// `cfg` is NULL or points to a live tf_config.
pub(crate) unsafe fn config_or_default(cfg: *const tf_config) -> Config {
    // SAFETY: forwarded from the caller.
    match unsafe { cfg.as_ref() } {
        Some(c) => c.inner.clone(),
        None => Config::default(),
    }
}

/// Starts a server: binds and listens before it returns (a busy or bad
/// address is reported here: TF_ERR_IO or TF_ERR_INVALID, with the reason
/// in tf_last_error()), then starts the loop thread. On success `*out` is
/// the new server, written before any callback can run (a callback may use
/// a handle the host stores from `*out`); on failure `*out` is untouched.
///
/// `cfg` may be NULL (all defaults). `cb->on_message` is required unless
/// the configuration has on_messages (tf_config_set_on_messages()); then it
/// is never called and may be NULL.
///
/// **Thread:** any thread. Callbacks then run on the server's own thread.
/// **Ownership:** `cfg` and `*cb` are copied: free them when you like. The
/// caller owns `*out` and must release it with tf_server_free();
/// `cb->user_data` must stay valid until tf_server_stop() has returned.
#[no_mangle]
pub unsafe extern "C" fn tf_server_start(
    cfg: *const tf_config,
    cb: *const tf_callbacks,
    out: *mut *mut tf_server,
) -> i32 {
    guard(|| {
        // SAFETY: `cb` is NULL or a live tf_callbacks; `out` NULL or writable.
        let cb = unsafe { arg_ref(cb, "cb")? };
        let out = super::arg_out(out, "out")?;
        // SAFETY: `cfg` is NULL or a live tf_config (this function's contract).
        let (on_messages, on_writable) =
            unsafe { cfg.as_ref() }.map_or((None, None), |c| (c.on_messages, c.on_writable));
        if cb.on_message.is_none() && on_messages.is_none() {
            return Err(Error::invalid(
                "cb->on_message is NULL and no on_messages was set (tf_config_set_on_messages): one is required",
            ));
        }
        // SAFETY: as above.
        let config = unsafe { config_or_default(cfg) };
        let cb = *cb;
        let inner = Server::start(&config, |_| Callbacks {
            cb,
            peer: Vec::new(),
            batch: on_messages.map(super::batch::Batch::new),
            on_writable,
        })?;
        let srv = Box::into_raw(Box::new(tf_server { inner, pull: None }));
        // SAFETY: `out` is non-NULL and writable.
        unsafe { out.write(srv) };
        // SAFETY: just created above; nothing else can have freed it yet.
        unsafe { &*srv }.inner.open();
        Ok(())
    })
}

/// The server, or TF_ERR_INVALID for NULL.
///
/// # Safety
/// `srv` is NULL or a live tf_server.
pub(crate) unsafe fn server<'a>(srv: *const tf_server) -> Result<&'a tf_server> {
    // SAFETY: forwarded from the caller.
    unsafe { arg_ref(srv, "srv") }
}

/// The port the server is bound to (useful after asking for port 0);
/// 0 for anything but a TCP listener (Unix socket, `none`), for NULL, or in
/// a child process forked after the server started.
///
/// **Thread:** any thread.
#[no_mangle]
pub unsafe extern "C" fn tf_server_port(srv: *const tf_server) -> u16 {
    guard_or(0, || {
        // SAFETY: `srv` is NULL or a live tf_server.
        let s = unsafe { server(srv)? };
        s.inner.check_process()?;
        Ok(s.inner.port())
    })
}

/// Queues one frame for `conn`: the library adds the prefix and copies
/// `data`. Frames sent to one connection from one thread go out in call
/// order. A frame accepted for a connection that closes before it is
/// written is dropped; on_close tells you. `data` may be NULL when len is 0.
///
/// Returns TF_OK; TF_ERR_STOPPED once stop has begun (it wins over the
/// others); TF_ERR_TOO_LARGE if len > max frame; TF_ERR_NO_CONN for an
/// unknown or closed id (or after tf_conn_close on it); TF_ERR_FULL if the
/// connection's queued output would pass its limit (nothing was queued);
/// TF_ERR_INVALID for NULL pointers.
///
/// **Thread:** any thread, including inside callbacks, where it takes no
/// lock and makes no system call (frames are written once per loop pass).
/// **Ownership:** `data` is copied before the call returns.
#[no_mangle]
pub unsafe extern "C" fn tf_send(srv: *mut tf_server, conn: tf_conn_id, data: *const u8, len: usize) -> i32 {
    guard(|| {
        // SAFETY: `srv` is NULL or a live tf_server.
        let s = unsafe { server(srv)? };
        // SAFETY: `data` is NULL or `len` readable bytes (checked after the
        // server's state, so that STOPPED wins as the contract says).
        s.inner.send_with(conn, || unsafe { frame_bytes(data, len, "data") })
    })
}

/// Stops reading from `conn`, writes what is already queued for it, then
/// closes it; on_close(TF_CLOSE_LOCAL) follows on the loop thread. A peer
/// that has not read it all within the close timeout (default 10 s, see
/// tf_config_set_close_timeout_ms()) is reset, still as TF_CLOSE_LOCAL;
/// tf_conn_abort() gives up at once. After it, tf_send on `conn` returns
/// TF_ERR_NO_CONN, and so does a second tf_conn_close.
///
/// Returns TF_OK; TF_ERR_NO_CONN for an unknown or closed id, or one
/// already closing for another reason (too large, idle, I/O error, overload,
/// peer gone): its on_close then carries that reason; TF_ERR_STOPPED once
/// stop has begun.
///
/// **Thread:** any thread, including inside callbacks.
#[no_mangle]
pub unsafe extern "C" fn tf_conn_close(srv: *mut tf_server, conn: tf_conn_id) -> i32 {
    guard(|| {
        // SAFETY: `srv` is NULL or a live tf_server.
        unsafe { server(srv)? }.inner.close(conn)
    })
}

/// Closes `conn` now: its queued output is discarded and the socket is
/// reset (the peer sees a connection reset); on_close(TF_CLOSE_LOCAL)
/// follows on the loop thread. Also allowed after tf_conn_close(), to give
/// up on a peer that does not read what it is owed. After it, tf_send on
/// `conn` returns TF_ERR_NO_CONN.
///
/// Returns TF_OK; TF_ERR_NO_CONN for an unknown id, one whose on_close has
/// run (or is due: its pull-mode CLOSE event was produced), or one already
/// closing for a reason of its own (too large, idle, I/O error, overload);
/// TF_ERR_STOPPED once stop has begun; TF_ERR_INVALID for NULL.
///
/// **Thread:** any thread, including inside callbacks.
#[no_mangle]
pub unsafe extern "C" fn tf_conn_abort(srv: *mut tf_server, conn: tf_conn_id) -> i32 {
    guard(|| {
        // SAFETY: `srv` is NULL or a live tf_server.
        unsafe { server(srv)? }.inner.abort(conn)
    })
}

/// Closes the listener now (a Unix socket's file is removed): new
/// connection attempts are refused, a load balancer's health check marks
/// the instance down, and another server (of this process or a new one) can
/// bind the same address as soon as this returns. Every open connection goes
/// on being served normally, and tf_connect() still works. Use it for
/// rolling restarts: drain, wait until connections_active is 0 (or a
/// deadline), stop. Idempotent.
///
/// Connections whose handshake the kernel completed before the call (its
/// accept queue) are accepted and served, not reset; every attempt after
/// the call returns is refused.
///
/// Returns TF_OK; TF_ERR_STOPPED once stop has begun; TF_ERR_INVALID for
/// NULL. The listener stops listening during the call, on the calling
/// thread. From a host thread the call then waits until the server's first
/// loop thread has closed it (and removed a Unix socket's file). From
/// inside any callback (of this server or of another one) it returns at
/// once, since waiting there could deadlock: the descriptor is closed, and
/// the file removed, at that loop's next turn (right after the callback
/// when it is this server's first loop thread). An inherited `fd:N`
/// listener is never shut down (other processes may share it), only closed.
///
/// **Thread:** any thread, including inside callbacks.
#[no_mangle]
pub unsafe extern "C" fn tf_server_drain(srv: *mut tf_server) -> i32 {
    guard(|| {
        // SAFETY: `srv` is NULL or a live tf_server.
        unsafe { server(srv)? }.inner.drain()
    })
}

/// Copies the server's counters into `*out` (a consistent-enough snapshot).
/// Counters change before the callback that reports an event runs.
///
/// **Thread:** any thread, including inside callbacks; also after stop.
/// **Ownership:** `*out` is the caller's; written only on success.
#[no_mangle]
pub unsafe extern "C" fn tf_server_stats(srv: *const tf_server, out: *mut tf_stats) -> i32 {
    guard(|| {
        // SAFETY: `srv` is NULL or a live tf_server.
        let s = unsafe { server(srv)? };
        let out = super::arg_out(out, "out")?;
        let v = s.inner.stats()?;
        let stats = tf_stats {
            connections_active: v.connections_active,
            connections_accepted: v.connections_accepted,
            connections_rejected: v.connections_rejected,
            frames_received: v.frames_received,
            frames_sent: v.frames_sent,
            bytes_received: v.bytes_received,
            bytes_sent: v.bytes_sent,
            closed_too_large: v.closed_too_large,
            closed_idle: v.closed_idle,
        };
        // SAFETY: `out` is non-NULL and points to writable (possibly
        // uninitialized) memory for one tf_stats.
        unsafe { out.write(stats) };
        Ok(())
    })
}

/// Stops the server: stops accepting and delivering messages, gives queued
/// output up to `drain_ms` to be written, closes every connection
/// (on_close(TF_CLOSE_SHUTDOWN) for each still open) and joins the loop
/// thread. When it returns no callback will run again, so user_data may be
/// freed. Idempotent: a later call returns TF_OK at once, and a call made while
/// another thread is stopping the server returns when that stop is over (no
/// callback runs after either returns).
///
/// Returns TF_ERR_INVALID when called from inside any callback, of this
/// server or of another one (waiting there for a loop thread could wait for
/// itself, or for a loop that waits for it); TF_ERR_STOPPED in a forked child.
///
/// **Thread:** any thread except inside callbacks (of any server).
#[no_mangle]
pub unsafe extern "C" fn tf_server_stop(srv: *mut tf_server, drain_ms: u32) -> i32 {
    guard(|| {
        // SAFETY: `srv` is NULL or a live tf_server.
        unsafe { server(srv)? }.inner.stop(Duration::from_millis(drain_ms as u64))
    })
}

/// Stops the server (drain 0) if it is still running, then frees it. NULL
/// is fine. When it returns, no callback of the server will run again
/// (so its user_data may be freed), with the two exceptions below.
///
/// - From inside one of the server's OWN callbacks: it returns at once; no
///   callback of that server runs afterwards, not even on_close for the
///   connections still open (the host is tearing it down); its listener and
///   connections are closed by its loop thread within about a second, as
///   soon as the calling callback has returned.
/// - From inside a callback of ANOTHER server it waits like a call from any
///   thread. But if the server being freed is itself, at that moment, inside
///   a callback waiting to free the caller's server (two servers freeing
///   each other), waiting would deadlock: then this call returns at once,
///   and the freed server runs no callback after the one in progress (the
///   one that is freeing the caller's server) returns.
///
/// In a child process forked after the server started, it frees nothing the
/// parent uses (the memory is left as is).
///
/// **Thread:** any thread, once per server, including inside callbacks of
/// this or another server, and thread-exit destructors.
/// **Ownership:** `srv` is invalid afterwards, and so are event data pointers.
#[no_mangle]
pub unsafe extern "C" fn tf_server_free(srv: *mut tf_server) {
    guard(|| {
        if srv.is_null() {
            return Ok(());
        }
        // SAFETY: non-NULL pointers given here come from tf_server_start*
        // and are live until this call. Only shared references exist while
        // the loop may still run callbacks that use `srv`.
        let s = unsafe { &*srv };
        if s.inner.check_process().is_err() {
            return Ok(()); // the parent's server: touch nothing, free nothing
        }
        // SAFETY: freed once, as documented. With Freed::Now the loop thread
        // has ended: nothing else uses `srv`. With Freed::ByLoop a callback of
        // this server may still be running (and using `srv`): the loop thread
        // drops the handle once that callback has returned.
        let handle = unsafe { Box::from_raw(srv) };
        match handle.inner.stop_for_free() {
            Freed::Now => drop(handle),
            Freed::ByLoop => handle.inner.core().clone().defer_drop(handle),
        }
        Ok(())
    });
}
