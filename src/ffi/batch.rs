//! Batched delivery and sends, for hosts whose calls are costly (ctypes,
//! JNI): tf_config_set_on_messages, tf_send_batch, and the packed forms
//! tf_events_pack / tf_send_packed that a host can build and slice as bytes.

use super::pull::{tf_event, TF_EVENT_MESSAGE};
use super::server::{server, tf_server};
use super::{arg_bytes, arg_mut, arg_out, frame_bytes, guard, tf_config, tf_conn_id};
use crate::error::{Error, Result};
use std::ffi::c_void;

/// The host's batched message callback.
pub(crate) type OnMessagesFn =
    unsafe extern "C" fn(user_data: *mut c_void, events: *const tf_event, count: usize);

/// A batch is delivered early once it holds this many frames...
const BATCH_EVENTS: usize = 4096;
/// ...or this many payload bytes (frames are copied out of the read buffer).
const BATCH_BYTES: usize = 1 << 20;

/// Frames held for one on_messages call: payloads copied into one arena,
/// since the read buffer is reused for the next connection's read.
pub(crate) struct Batch {
    f: OnMessagesFn,
    arena: Vec<u8>,
    /// (connection, offset in arena, length)
    held: Vec<(u64, usize, usize)>,
    events: Vec<tf_event>,
}

impl Batch {
    pub(crate) fn new(f: OnMessagesFn) -> Batch {
        Batch { f, arena: Vec::new(), held: Vec::new(), events: Vec::new() }
    }

    /// Holds one frame; false when memory for it cannot be had (the
    /// connection is then closed with TF_CLOSE_OVERLOAD).
    pub(crate) fn hold(&mut self, user_data: *mut c_void, conn: u64, data: &[u8]) -> bool {
        if self.held.len() >= BATCH_EVENTS || self.arena.len() + data.len() > BATCH_BYTES.max(data.len()) {
            self.deliver(user_data, true);
        }
        if self.arena.try_reserve(data.len()).is_err() || self.held.try_reserve(1).is_err() {
            return false;
        }
        self.held.push((conn, self.arena.len(), data.len()));
        self.arena.extend_from_slice(data);
        true
    }

    /// Calls on_messages with every held frame (when `deliver`), then
    /// forgets them. A large arena is not kept.
    pub(crate) fn deliver(&mut self, user_data: *mut c_void, deliver: bool) {
        if self.held.is_empty() {
            return;
        }
        if deliver && self.events.try_reserve(self.held.len()).is_ok() {
            let base = self.arena.as_ptr();
            self.events.extend(self.held.iter().map(|&(conn, off, len)| tf_event {
                kind: TF_EVENT_MESSAGE,
                reason: 0,
                conn,
                // SAFETY: `off + len` is within the arena, written above.
                data: if len == 0 { std::ptr::null() } else { unsafe { base.add(off) } },
                len,
            }));
            // SAFETY: the host's function, with `count` events whose data
            // stays valid until it returns.
            unsafe { (self.f)(user_data, self.events.as_ptr(), self.events.len()) };
            self.events.clear();
        }
        self.held.clear();
        self.arena.clear();
        if self.arena.capacity() > BATCH_BYTES {
            self.arena = Vec::new();
        }
    }
}

/// Delivers inbound frames in arrays instead of one on_message call each:
/// one call carries the frames the loop thread decoded in one pass over the
/// ready connections (at most 4096 frames or 1 MiB of payload per call;
/// order per connection kept), as TF_EVENT_MESSAGE events (`reason` 0). With
/// it set, on_message is never called and may be NULL; on_connect and
/// on_close are unchanged. A tf_conn_close (or pause) made during the call
/// applies to the batches after it. No effect in pull mode (tf_server_poll
/// already returns arrays). NULL turns it off.
///
/// **Thread:** any thread, one at a time per configuration. `on_messages`
/// runs on the server's loop thread, like every callback, and receives the
/// `user_data` of tf_callbacks.
/// **Ownership:** `events` and each event's `data` are valid during the call
/// only: copy what you keep. `count` is at least 1.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_on_messages(
    cfg: *mut tf_config,
    on_messages: Option<unsafe extern "C" fn(user_data: *mut c_void, events: *const tf_event, count: usize)>,
) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        unsafe { arg_mut(cfg, "cfg")? }.on_messages = on_messages;
        Ok(())
    })
}

/// One frame of a tf_send_batch() call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct tf_out {
    pub conn: tf_conn_id,
    /// The payload (NULL is fine when len is 0).
    pub data: *const u8,
    pub len: usize,
    /// Written by tf_send_batch: the TF_* code tf_send would have returned.
    pub result: i32,
}

/// Queues many frames, for many connections, in one call: each entry is
/// treated exactly as tf_send() would treat it, in order, and its code goes
/// into its `result`. From a host thread the whole batch takes the
/// server's lock once.
///
/// Returns TF_OK (look at each `result`); TF_ERR_INVALID for NULL `outs`
/// with n > 0; TF_ERR_STOPPED once stop has begun, and then no entry was
/// queued (the results are not written). With several loop threads, stop
/// can begin during the call: then the entries queued before keep TF_OK,
/// the others get TF_ERR_STOPPED, and the call returns TF_OK.
///
/// **Thread:** any thread, including inside callbacks.
/// **Ownership:** every payload is copied before the call returns.
#[no_mangle]
pub unsafe extern "C" fn tf_send_batch(srv: *mut tf_server, outs: *mut tf_out, n: usize) -> i32 {
    guard(|| {
        // SAFETY: `srv` is NULL or a live tf_server.
        let s = unsafe { server(srv)? };
        if n == 0 {
            return s.inner.check_live();
        }
        if outs.is_null() {
            return Err(Error::invalid("outs is NULL but n is not 0"));
        }
        // SAFETY: `outs` points to `n` entries the caller owns for the call.
        let outs = unsafe { std::slice::from_raw_parts_mut(outs, n) };
        let mut entries: Vec<(u64, Result<&[u8]>)> = Vec::new();
        entries
            .try_reserve_exact(n)
            .map_err(|_| Error::new(crate::error::Code::Full, "no memory for the batch"))?;
        for o in outs.iter() {
            // SAFETY: each entry's data is NULL or `len` readable bytes.
            entries.push((o.conn, unsafe { frame_bytes(o.data, o.len, "data") }));
        }
        let codes = s.inner.send_batch(&entries)?;
        for (o, code) in outs.iter_mut().zip(codes) {
            o.result = code;
        }
        Ok(())
    })
}

/// Size of a record header in the packed layouts.
const PACKED_EVENT_HEADER: usize = 24;
const PACKED_SEND_HEADER: usize = 16;

/// Copies events (from on_messages or tf_server_poll) into one buffer that a
/// host can read as bytes: per event, little-endian and unpadded, int32
/// kind, int32 reason, uint64 conn, uint64 len, then `len` bytes (the
/// payload, or the peer text without its NUL). One call replaces a field
/// access per event for hosts whose calls are costly (Python's ctypes).
///
/// Returns TF_OK with `*needed` the bytes written; TF_ERR_FULL when `cap` is
/// too small (nothing written, `*needed` says how much is needed);
/// TF_ERR_INVALID for NULL `needed`, NULL `events` with count > 0, or NULL
/// `out` with cap > 0.
///
/// **Thread:** any thread (it only reads `events`).
/// **Ownership:** `events` must be valid for the call (inside on_messages,
/// or before the next tf_server_poll); `out` is the caller's.
#[no_mangle]
pub unsafe extern "C" fn tf_events_pack(
    events: *const tf_event,
    count: usize,
    out: *mut u8,
    cap: usize,
    needed: *mut usize,
) -> i32 {
    guard(|| {
        let needed = arg_out(needed, "needed")?;
        if count > 0 && events.is_null() {
            return Err(Error::invalid("events is NULL but count is not 0"));
        }
        if cap > 0 && out.is_null() {
            return Err(Error::invalid("out is NULL but cap is not 0"));
        }
        let events: &[tf_event] = if count == 0 {
            &[]
        } else {
            // SAFETY: `events` points to `count` events (checked non-NULL).
            unsafe { std::slice::from_raw_parts(events, count) }
        };
        let mut total = 0usize;
        for e in events {
            total = total
                .checked_add(PACKED_EVENT_HEADER)
                .and_then(|t| t.checked_add(e.len))
                .ok_or_else(|| Error::invalid("events too large to pack"))?;
        }
        // SAFETY: `needed` is non-NULL and writable.
        unsafe { needed.write(total) };
        if total > cap {
            return Err(Error::new(
                crate::error::Code::Full,
                format!("tf_events_pack needs {total} bytes, cap is {cap}"),
            ));
        }
        if total == 0 {
            return Ok(());
        }
        // SAFETY: `out` has `cap` >= `total` writable bytes.
        let out = unsafe { std::slice::from_raw_parts_mut(out, total) };
        let mut at = 0;
        for e in events {
            out[at..at + 4].copy_from_slice(&e.kind.to_le_bytes());
            out[at + 4..at + 8].copy_from_slice(&e.reason.to_le_bytes());
            out[at + 8..at + 16].copy_from_slice(&e.conn.to_le_bytes());
            out[at + 16..at + 24].copy_from_slice(&(e.len as u64).to_le_bytes());
            at += PACKED_EVENT_HEADER;
            // SAFETY: an event's data is NULL or `len` readable bytes.
            let data = unsafe { arg_bytes(e.data, e.len, "event data")? };
            out[at..at + e.len].copy_from_slice(data);
            at += e.len;
        }
        Ok(())
    })
}

/// Sends frames packed in one buffer, the counterpart of tf_events_pack():
/// per frame, little-endian and unpadded, uint64 conn, uint64 len, then `len`
/// payload bytes. Each frame is treated exactly as tf_send() would treat it,
/// in order; its code goes to `results[i]`; `*count` is the number of frames.
///
/// Returns TF_OK; TF_ERR_INVALID when the buffer does not parse (a record
/// runs past `len`), when it holds more than `max_results` frames, or for
/// NULL pointers (`buf` may be NULL when len is 0) — then nothing was
/// queued; TF_ERR_STOPPED once stop has begun (nothing queued).
///
/// **Thread:** any thread, including inside callbacks.
/// **Ownership:** payloads are copied before the call returns.
#[no_mangle]
pub unsafe extern "C" fn tf_send_packed(
    srv: *mut tf_server,
    buf: *const u8,
    len: usize,
    results: *mut i32,
    max_results: usize,
    count: *mut usize,
) -> i32 {
    guard(|| {
        // SAFETY: `srv` is NULL or a live tf_server.
        let s = unsafe { server(srv)? };
        let count = arg_out(count, "count")?;
        // SAFETY: `buf` is NULL or `len` readable bytes.
        let mut rest = unsafe { arg_bytes(buf, len, "buf")? };
        if max_results > 0 && results.is_null() {
            return Err(Error::invalid("results is NULL but max_results is not 0"));
        }
        let mut entries: Vec<(u64, Result<&[u8]>)> = Vec::new();
        while !rest.is_empty() {
            if rest.len() < PACKED_SEND_HEADER {
                return Err(Error::invalid("packed buffer ends inside a record header"));
            }
            let conn = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
            let n = u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes"));
            let n = usize::try_from(n)
                .ok()
                .filter(|&n| n <= rest.len() - PACKED_SEND_HEADER)
                .ok_or_else(|| Error::invalid("packed record runs past the end of the buffer"))?;
            if entries.len() == max_results {
                return Err(Error::invalid(format!(
                    "more than max_results ({max_results}) frames in the buffer"
                )));
            }
            entries
                .try_reserve(1)
                .map_err(|_| Error::new(crate::error::Code::Full, "no memory for the batch"))?;
            entries.push((conn, Ok(&rest[PACKED_SEND_HEADER..PACKED_SEND_HEADER + n])));
            rest = &rest[PACKED_SEND_HEADER + n..];
        }
        let codes = if entries.is_empty() { Vec::new() } else { s.inner.send_batch(&entries)? };
        for (i, code) in codes.iter().enumerate() {
            // SAFETY: `results` has room for `max_results` >= entries codes.
            unsafe { results.add(i).write(*code) };
        }
        // SAFETY: `count` is non-NULL and writable.
        unsafe { count.write(codes.len()) };
        Ok(())
    })
}
