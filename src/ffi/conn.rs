//! Per-connection control at the C boundary: user data, pause and resume,
//! gather and fan-out sends, writable notifications, the slow-consumer
//! policy and connection info.

use super::server::{server, tf_server};
use super::{arg_mut, arg_out, frame_bytes, guard, guard_or, tf_config, tf_conn_id};
use crate::error::Error;
use crate::outq::Frame;
use std::ffi::c_void;

/// Attaches the host's pointer to `conn` (NULL clears it). The library
/// never uses or frees it. It stays readable with tf_conn_user_data() until
/// on_close for that connection has returned (so on_close can free it; in
/// pull mode, until the tf_server_poll() after the one that returned its
/// CLOSE event); then the connection is unknown. If on_connect sets it and
/// then refuses the connection, no on_close follows: free it there.
///
/// Returns TF_OK; TF_ERR_NO_CONN for an unknown connection or one whose
/// on_close has returned; TF_ERR_INVALID for NULL `srv`. Works while the
/// server stops (on_close(TF_CLOSE_SHUTDOWN) may clear it).
///
/// **Thread:** any thread, on_connect included; without a lock inside a
/// callback of the connection's own loop thread.
/// **Ownership:** `ptr` stays the host's.
#[no_mangle]
pub unsafe extern "C" fn tf_conn_set_user_data(
    srv: *mut tf_server,
    conn: tf_conn_id,
    ptr: *mut c_void,
) -> i32 {
    guard(|| {
        // SAFETY: `srv` is NULL or a live tf_server.
        unsafe { server(srv)? }.inner.set_user_data(conn, ptr as usize)
    })
}

/// The pointer set with tf_conn_set_user_data(); NULL when unset, or for an
/// unknown connection (or NULL `srv`).
///
/// **Thread:** any thread; without a lock and without a system call inside
/// a callback of the connection's own loop thread (on_message, on_close...).
/// **Ownership:** the pointer is the host's.
#[no_mangle]
pub unsafe extern "C" fn tf_conn_user_data(srv: *const tf_server, conn: tf_conn_id) -> *mut c_void {
    guard_or(std::ptr::null_mut(), || {
        // SAFETY: `srv` is NULL or a live tf_server.
        Ok(unsafe { server(srv)? }.inner.user_data(conn) as *mut c_void)
    })
}

/// Stops reading from `conn`: the peer is slowed by TCP. Called inside a
/// callback of the connection's loop thread, no further on_message for it
/// runs after the call, not even for frames already read; from another
/// thread, within one loop iteration. Writing to it goes on as usual. Its
/// idle timeout does not run while paused, and a peer that leaves may be
/// noticed only at resume or stop. Idempotent (no nesting count).
///
/// Returns TF_OK; TF_ERR_NO_CONN for an unknown or closed connection;
/// TF_ERR_STOPPED once stop has begun.
///
/// **Thread:** any thread, including inside callbacks.
#[no_mangle]
pub unsafe extern "C" fn tf_conn_pause(srv: *mut tf_server, conn: tf_conn_id) -> i32 {
    guard(|| {
        // SAFETY: `srv` is NULL or a live tf_server.
        unsafe { server(srv)? }.inner.pause(conn, true)
    })
}

/// Ends a tf_conn_pause(): what was held back is delivered first, in order,
/// then the connection is read again. Idempotent. Codes as tf_conn_pause().
///
/// **Thread:** any thread, including inside callbacks.
#[no_mangle]
pub unsafe extern "C" fn tf_conn_resume(srv: *mut tf_server, conn: tf_conn_id) -> i32 {
    guard(|| {
        // SAFETY: `srv` is NULL or a live tf_server.
        unsafe { server(srv)? }.inner.pause(conn, false)
    })
}

/// One piece of a tf_sendv() payload.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct tf_iovec {
    pub base: *const u8,
    pub len: usize,
}

/// Queues one frame whose payload is the pieces joined (a header and a
/// body in different buffers, say), copied once. Same rules and codes as
/// tf_send(); iovcnt 0 is an empty frame; NULL `iov` with iovcnt > 0, or a
/// NULL `base` with a non-zero len, is TF_ERR_INVALID.
///
/// **Thread:** any thread, including inside callbacks.
/// **Ownership:** the pieces are copied before the call returns.
#[no_mangle]
pub unsafe extern "C" fn tf_sendv(
    srv: *mut tf_server,
    conn: tf_conn_id,
    iov: *const tf_iovec,
    iovcnt: usize,
) -> i32 {
    guard(|| {
        // SAFETY: `srv` is NULL or a live tf_server.
        let s = unsafe { server(srv)? };
        s.inner.check_live()?;
        if iovcnt > 0 && iov.is_null() {
            return Err(Error::invalid("iov is NULL but iovcnt is not 0"));
        }
        let iov: &[tf_iovec] = if iovcnt == 0 {
            &[]
        } else {
            // SAFETY: `iov` points to `iovcnt` entries (checked non-NULL).
            unsafe { std::slice::from_raw_parts(iov, iovcnt) }
        };
        let mut parts: Vec<&[u8]> = Vec::new();
        parts.try_reserve_exact(iov.len()).map_err(|_| Error::new(crate::error::Code::Full, "no memory"))?;
        let mut total = 0usize;
        for (i, v) in iov.iter().enumerate() {
            // SAFETY: each piece is NULL or `len` readable bytes.
            let part = unsafe { frame_bytes(v.base, v.len, &format!("iov[{i}].base"))? };
            total = total.checked_add(part.len()).ok_or_else(|| Error::invalid("iovec lengths overflow"))?;
            parts.push(part);
        }
        s.inner.send_frame(conn, Frame::Parts(&parts, total))
    })
}

/// Queues the same frame for each connection of `conns` (fan-out; an id
/// listed twice gets it twice). The payload is copied once and shared by
/// every queue it goes to (for payloads of 512 bytes or more). Entries that
/// are unknown, closed or full are skipped (a full one counts as a
/// TF_ERR_FULL for on_writable); `*queued` (may be NULL) says how many
/// entries took it.
///
/// Returns TF_OK even when some were skipped; TF_ERR_STOPPED once stop has
/// begun, and then no entry took it (with several loop threads, stop can
/// begin during the call: entries that took it before are counted in
/// `*queued`, the rest skipped, and the call returns TF_OK); n = 0 is TF_OK whatever `conns` is; TF_ERR_INVALID for NULL
/// `conns` with n > 0 or NULL `data` with len > 0; TF_ERR_TOO_LARGE when len
/// passes max frame.
///
/// **Thread:** any thread, including inside callbacks (one lock for the
/// whole call from a host thread).
/// **Ownership:** `data` and `conns` are read during the call only.
#[no_mangle]
pub unsafe extern "C" fn tf_send_many(
    srv: *mut tf_server,
    conns: *const tf_conn_id,
    n: usize,
    data: *const u8,
    len: usize,
    queued: *mut usize,
) -> i32 {
    guard(|| {
        // SAFETY: `srv` is NULL or a live tf_server.
        let s = unsafe { server(srv)? };
        s.inner.check_live()?;
        let ids: &[u64] = if n == 0 {
            &[]
        } else if conns.is_null() {
            return Err(Error::invalid("conns is NULL but n is not 0"));
        } else {
            // SAFETY: `conns` points to `n` ids (checked non-NULL).
            unsafe { std::slice::from_raw_parts(conns, n) }
        };
        // SAFETY: `data` is NULL or `len` readable bytes.
        let payload = unsafe { frame_bytes(data, len, "data")? };
        let count = s.inner.send_many(ids, payload)?;
        if !queued.is_null() {
            // SAFETY: non-NULL `queued` points to a writable size_t.
            unsafe { queued.write(count) };
        }
        Ok(())
    })
}

/// Asks to be told when a full queue has room again: after a tf_send* to
/// `conn` returned TF_ERR_FULL, `on_writable(conn)` is called once, on the
/// loop thread, when that connection's queued output (prefixes included)
/// has fallen to half of max queued output or less (not if it closes
/// first). In pull mode, setting it (non-NULL) turns these notifications on
/// as TF_EVENT_WRITABLE events (reason 0) and the function itself is never
/// called; without it no such event is delivered. NULL turns it off.
///
/// **Thread:** any thread, one at a time per configuration; `on_writable`
/// runs on the loop thread and receives the `user_data` of tf_callbacks.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_on_writable(
    cfg: *mut tf_config,
    on_writable: Option<unsafe extern "C" fn(user_data: *mut c_void, conn: tf_conn_id)>,
) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        let cfg = unsafe { arg_mut(cfg, "cfg")? };
        cfg.on_writable = on_writable;
        cfg.inner.writable_events = on_writable.is_some();
        Ok(())
    })
}

/// Redis's soft output limit: a connection whose queued output stays above
/// `soft_bytes` for `seconds` without a break is closed with TF_CLOSE_SLOW
/// and its queued output discarded. 0, 0 (the default) turns it off;
/// `soft_bytes` > 0 with `seconds` 0 is TF_ERR_INVALID.
///
/// **Thread:** any thread, one at a time per configuration.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_slow_consumer(
    cfg: *mut tf_config,
    soft_bytes: u64,
    seconds: u32,
) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        unsafe { arg_mut(cfg, "cfg")? }.inner.set_slow_consumer(soft_bytes, seconds)
    })
}

/// What tf_conn_get_info() reports about one connection.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct tf_conn_info {
    /// The text on_connect got, NUL-terminated (cut to 127 bytes).
    pub peer: [std::ffi::c_char; 128],
    /// Prefixes included, as in tf_stats.
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub frames_received: u64,
    pub frames_sent: u64,
    /// Bytes accepted by tf_send* and not yet written.
    pub queued_output: u64,
    /// Since it was accepted (or since tf_connect).
    pub age_ms: u64,
    /// 1 for a tf_connect connection.
    pub outbound: i32,
    /// 1 between tf_conn_pause and tf_conn_resume.
    pub paused: i32,
    /// Index of its loop thread, 0..n-1.
    pub thread: u32,
    /// 0.
    pub reserved: u32,
}

/// Fills `*out` with what is known about `conn`: its peer, its counters,
/// its queued output, its age.
///
/// Returns TF_OK; TF_ERR_NO_CONN for an unknown or closed connection (one
/// closing by tf_conn_close still answers while its queued output is
/// written, until its on_close); TF_ERR_INVALID for NULL pointers.
///
/// **Thread:** any thread, including inside callbacks.
/// **Ownership:** `*out` is the caller's; written only on success.
#[no_mangle]
pub unsafe extern "C" fn tf_conn_get_info(
    srv: *const tf_server,
    conn: tf_conn_id,
    out: *mut tf_conn_info,
) -> i32 {
    guard(|| {
        // SAFETY: `srv` is NULL or a live tf_server.
        let s = unsafe { server(srv)? };
        let out = arg_out(out, "out")?;
        let info = s.inner.conn_info(conn)?;
        let mut peer = [0 as std::ffi::c_char; 128];
        for (dst, &b) in peer.iter_mut().zip(info.peer.as_bytes().iter().take(127)) {
            *dst = b as std::ffi::c_char;
        }
        let value = tf_conn_info {
            peer,
            bytes_received: info.bytes_received,
            bytes_sent: info.bytes_sent,
            frames_received: info.frames_received,
            frames_sent: info.frames_sent,
            queued_output: info.queued_output,
            age_ms: info.age_ms,
            outbound: info.outbound as i32,
            paused: info.paused as i32,
            thread: info.thread,
            reserved: 0,
        };
        // SAFETY: `out` is non-NULL and points to writable memory for one
        // tf_conn_info (possibly uninitialized).
        unsafe { out.write(value) };
        Ok(())
    })
}

/// Starts an outbound connection to `addr` ("IPv4:PORT", "[IPv6]:PORT",
/// "unix:/path" or "unix:@name"; host names are not resolved) from the
/// server's loop, and returns at once with its id in `*out`. Once
/// established it is like an accepted connection: on_connect(conn, peer)
/// with `peer` the address as connected to ("127.0.0.1:7000", "[::1]:7000",
/// "unix:/path", "unix:@name"; its return value is ignored), its idle clock
/// starting there, on_message per frame, tf_send, tf_conn_close, limits,
/// framing, and exactly one on_close. If it cannot be established (refused,
/// unreachable, a missing Unix path, no answer within the connect timeout)
/// on_close(conn, TF_CLOSE_CONNECT_FAILED) follows and on_connect never
/// runs. Frames passed to tf_send before it is established are queued
/// (within max queued output) and written once it is; dropped if it fails.
/// tf_conn_close before it is established abandons it (on_close with
/// TF_CLOSE_LOCAL). It counts in connections_active while established,
/// never in connections_accepted; while being established it counts toward
/// max connections.
///
/// Returns TF_OK; TF_ERR_INVALID for NULL pointers or an address that does
/// not parse; TF_ERR_FULL when max connections is reached; TF_ERR_STOPPED
/// once stop has begun. Failing to reach the address is never a return code.
///
/// **Thread:** any thread, including inside callbacks.
/// **Ownership:** `addr` is copied; `*out` is written only on success.
#[no_mangle]
pub unsafe extern "C" fn tf_connect(
    srv: *mut tf_server,
    addr: *const std::ffi::c_char,
    out: *mut tf_conn_id,
) -> i32 {
    guard(|| {
        // SAFETY: `srv` is NULL or a live tf_server.
        let s = unsafe { server(srv)? };
        let out = arg_out(out, "out")?;
        // SAFETY: `addr` is NULL or a NUL-terminated string.
        let addr = unsafe { super::arg_str(addr, "addr")? };
        let id = s.inner.connect(addr)?;
        // SAFETY: `out` is non-NULL and writable.
        unsafe { out.write(id) };
        Ok(())
    })
}
