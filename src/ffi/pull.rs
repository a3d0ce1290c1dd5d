//! Pull mode at the C boundary: tf_server_start_pull, tf_server_fd, tf_server_poll.

use super::server::{config_or_default, server, tf_server};
use super::{guard, guard_or, tf_conn_id};
use crate::error::Error;
use crate::pull::{EventQueue, PullHandler, PullHost};
use crate::server::Server;

/// tf_event.kind: a connection was accepted; `data` is the peer text.
pub const TF_EVENT_CONNECT: i32 = 1;
/// tf_event.kind: a complete inbound frame; `data`/`len` are its payload.
pub const TF_EVENT_MESSAGE: i32 = 2;
/// tf_event.kind: the connection ended; `reason` is a TF_CLOSE_* value.
pub const TF_EVENT_CLOSE: i32 = 3;
/// tf_event.kind: a connection that got TF_ERR_FULL has room again (only
/// with tf_config_set_on_writable() set; reason 0, no data).
pub const TF_EVENT_WRITABLE: i32 = 4;

const _: () = {
    assert!(crate::pull::EVENT_CONNECT == TF_EVENT_CONNECT);
    assert!(crate::pull::EVENT_MESSAGE == TF_EVENT_MESSAGE);
    assert!(crate::pull::EVENT_CLOSE == TF_EVENT_CLOSE);
    assert!(crate::pull::EVENT_WRITABLE == TF_EVENT_WRITABLE);
};

/// One event of a pull-mode server. Events of one connection come in
/// order: CONNECT, MESSAGEs, CLOSE.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct tf_event {
    /// A TF_EVENT_* value.
    pub kind: i32,
    /// CLOSE: a TF_CLOSE_* value; otherwise 0.
    pub reason: i32,
    pub conn: tf_conn_id,
    /// MESSAGE: the payload (NULL when len is 0); CONNECT: the peer text,
    /// NUL-terminated; CLOSE: NULL. Valid until the next tf_server_poll()
    /// on this server (or tf_server_free()).
    pub data: *const u8,
    /// Payload length, or peer text length (without the NUL).
    pub len: usize,
}

/// Starts a server in pull mode: no callbacks; the host takes events with
/// tf_server_poll(), for example when tf_server_fd() is readable. Binds and
/// listens before it returns, like tf_server_start(). Every connection is
/// accepted (close unwanted ones with tf_conn_close()). When the host does
/// not keep up, the library stops reading sockets (TCP backpressure):
/// events are never dropped and the queue never grows without bound.
/// After tf_server_stop(), the events produced before it (ending with a
/// CLOSE, reason TF_CLOSE_SHUTDOWN, for each connection still open) can
/// still be taken; then tf_server_poll() returns TF_ERR_STOPPED.
///
/// **Thread:** any thread.
/// **Ownership:** `cfg` is copied. The caller owns `*out` and must release
/// it with tf_server_free(); `*out` is written only on success.
#[no_mangle]
pub unsafe extern "C" fn tf_server_start_pull(cfg: *const super::tf_config, out: *mut *mut tf_server) -> i32 {
    guard(|| {
        let out = super::arg_out(out, "out")?;
        // SAFETY: `cfg` is NULL or a live tf_config (this function's contract).
        let config = unsafe { config_or_default(cfg) };
        let queue = EventQueue::new().map_err(|e| Error::io("create eventfd", e))?;
        let inner = Server::start(&config, |_| PullHandler::new(queue.clone()))?;
        let pull = PullHost::new(queue, inner.loops().to_vec());
        let srv = Box::into_raw(Box::new(tf_server { inner, pull: Some(pull) }));
        // SAFETY: `out` is non-NULL and writable.
        unsafe { out.write(srv) };
        // SAFETY: just created above; nothing else can have freed it yet.
        unsafe { &*srv }.inner.open();
        Ok(())
    })
}

/// A descriptor that is readable while events wait (level-triggered), for
/// select/poll/epoll in the host's own loop. It also turns readable when the
/// server has stopped and every event was taken (tf_server_poll then says
/// TF_ERR_STOPPED). -1 for NULL, a callback-mode server, or a forked child.
///
/// **Thread:** any thread.
/// **Ownership:** the library owns the descriptor: never read, write or
/// close it; it is closed by tf_server_free().
#[no_mangle]
pub unsafe extern "C" fn tf_server_fd(srv: *const tf_server) -> std::ffi::c_int {
    guard_or(-1, || {
        // SAFETY: `srv` is NULL or a live tf_server.
        let s = unsafe { server(srv)? };
        s.inner.check_process()?;
        let pull = s.pull.as_ref().ok_or_else(|| Error::invalid("not a pull-mode server"))?;
        Ok(pull.fd())
    })
}

/// Takes up to `max` waiting events into `events[0..]`, waiting up to
/// `timeout_ms` for the first (0: don't wait, -1: forever), and sets
/// `*count`. Returns TF_OK (with `*count` 0 on timeout); TF_ERR_STOPPED once
/// the server has stopped and every event was taken; TF_ERR_INVALID for
/// NULL pointers, `max` 0, or a callback-mode server.
///
/// **Thread:** any thread, one at a time per server. A call with timeout 0
/// never waits: while another thread is inside tf_server_poll() on the same
/// server it returns TF_OK with `*count` 0.
/// **Ownership:** data pointers in the events stay valid until the next
/// tf_server_poll() on this server or tf_server_free().
#[no_mangle]
pub unsafe extern "C" fn tf_server_poll(
    srv: *mut tf_server,
    events: *mut tf_event,
    max: usize,
    count: *mut usize,
    timeout_ms: i32,
) -> i32 {
    guard(|| {
        // SAFETY: `srv` is NULL or a live tf_server.
        let s = unsafe { server(srv)? };
        let count = super::arg_out(count, "count")?;
        if events.is_null() || max == 0 {
            return Err(Error::invalid("events is NULL or max is 0"));
        }
        if timeout_ms < -1 {
            return Err(Error::invalid(format!("timeout_ms {timeout_ms} is out of range (-1, 0 or more)")));
        }
        s.inner.check_process()?;
        let pull = s.pull.as_ref().ok_or_else(|| Error::invalid("not a pull-mode server"))?;
        // SAFETY: `count` is non-NULL and writable.
        unsafe { count.write(0) };
        let Some(batch) = pull.poll(max, timeout_ms)? else {
            return Ok(()); // timeout 0 while another thread polls: no events
        };
        for (i, ev) in batch.iter().enumerate() {
            let e = tf_event {
                kind: ev.kind,
                reason: ev.reason,
                conn: ev.conn,
                data: if ev.data.is_empty() { std::ptr::null() } else { ev.data.as_ptr() },
                len: ev.len,
            };
            // SAFETY: the caller provides room for `max` events at `events`
            // (possibly uninitialized), and the batch holds at most `max`.
            unsafe { events.add(i).write(e) };
        }
        // SAFETY: as above.
        unsafe { count.write(batch.len()) };
        Ok(())
    })
}
