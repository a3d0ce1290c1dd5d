//! tf_config: the configuration builder, one setter per limit.

use super::{arg_mut, arg_str, guard};
use crate::config::{Config, LogLevel};
use std::ffi::{c_char, c_void, CString};
use std::sync::Arc;

/// Opaque configuration builder. Create with tf_config_new(), change with
/// the tf_config_set_* functions, pass to tf_server_start() (which copies
/// it), free with tf_config_free().
pub struct tf_config {
    pub(crate) inner: Config,
    /// Set by tf_config_set_on_messages: frames in arrays, one call per pass.
    pub(crate) on_messages: Option<super::batch::OnMessagesFn>,
    /// Set by tf_config_set_on_writable.
    pub(crate) on_writable: Option<unsafe extern "C" fn(*mut c_void, u64)>,
}

/// A new configuration with every default: address "127.0.0.1:5882",
/// 4096 max connections, 8 MiB max frame, no idle timeout, 16 MiB max
/// queued output per connection, 10 s close timeout, 1 GiB of partial
/// inbound frames in all, the platform's best backend, no log.
///
/// Returns NULL only when out of memory.
///
/// **Thread:** any thread.
/// **Ownership:** the caller owns the result and must free it with
/// tf_config_free() (tf_server_start() does not take it).
#[no_mangle]
pub extern "C" fn tf_config_new() -> *mut tf_config {
    super::guard_or(std::ptr::null_mut(), || {
        Ok(Box::into_raw(Box::new(tf_config {
            inner: Config::default(),
            on_messages: None,
            on_writable: None,
        })))
    })
}

/// Frees a configuration. NULL is fine.
///
/// **Thread:** any thread, once per configuration.
/// **Ownership:** `cfg` must come from tf_config_new(); it is invalid afterwards.
#[no_mangle]
pub unsafe extern "C" fn tf_config_free(cfg: *mut tf_config) {
    guard(|| {
        if !cfg.is_null() {
            // SAFETY: non-NULL pointers given here come from tf_config_new
            // (Box::into_raw) and are freed once, as documented.
            drop(unsafe { Box::from_raw(cfg) });
        }
        Ok(())
    });
}

/// Sets the listening address:
/// - "IPv4:PORT" or "[IPv6]:PORT", for example "127.0.0.1:5882" (default),
///   "0.0.0.0:9000", "[::1]:0"; port 0 picks a free port (see
///   tf_server_port()). Host names are not resolved.
/// - "unix:/path/name.sock": a Unix stream socket at that path (at most 107
///   bytes). An existing path is replaced only when it is a socket no process
///   listens on (left by a dead process); a live socket or any other file
///   there makes tf_server_start fail with TF_ERR_IO, and nothing is deleted.
///   tf_server_stop (or tf_server_drain) removes the file the server created.
///   The peer text of its connections is "unix:pid=PID,uid=UID,gid=GID"
///   (SO_PEERCRED), so on_connect can refuse by user.
/// - "unix:@name": a Linux abstract Unix socket (no file; at most 107 bytes).
/// - "fd:N": listen on descriptor N, an already bound and listening stream
///   socket inherited from the parent (systemd socket activation, inetd-style
///   supervisors). Not one: TF_ERR_INVALID at start, and the descriptor is
///   left open, still the caller's. After a successful start the server owns
///   it and closes it at stop.
/// - "none": no listener; the server only makes outbound connections
///   (tf_connect()).
///
/// Returns TF_OK, or TF_ERR_INVALID for NULL or an unparsable address
/// (the configuration is then unchanged).
///
/// **Thread:** any thread, one at a time per configuration.
/// **Ownership:** `addr` is copied; it may be freed after the call.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_address(cfg: *mut tf_config, addr: *const c_char) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config; `addr` NULL or a C string.
        let (cfg, addr) = unsafe { (arg_mut(cfg, "cfg")?, arg_str(addr, "addr")?) };
        cfg.inner.set_address(addr)
    })
}

/// Sets the most connections open at once (default 4096). More clients are
/// accepted and closed at once, counted in connections_rejected.
/// 0 is TF_ERR_INVALID.
///
/// **Thread:** any thread, one at a time per configuration.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_max_connections(cfg: *mut tf_config, n: u32) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        unsafe { arg_mut(cfg, "cfg")? }.inner.set_max_connections(n)
    })
}

/// Sets the largest payload, inbound and outbound (default 8 MiB, 8388608).
/// A peer announcing more is closed with TF_CLOSE_TOO_LARGE; tf_send() of
/// more returns TF_ERR_TOO_LARGE. 0 is TF_ERR_INVALID.
///
/// **Thread:** any thread, one at a time per configuration.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_max_frame(cfg: *mut tf_config, bytes: u32) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        unsafe { arg_mut(cfg, "cfg")? }.inner.set_max_frame(bytes)
    })
}

/// Sets the idle timeout: a connection that completes no inbound frame for
/// this long is closed with TF_CLOSE_IDLE (this also ends frames dribbled
/// too slowly). Default 0: never.
///
/// **Thread:** any thread, one at a time per configuration.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_idle_timeout_ms(cfg: *mut tf_config, ms: u32) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        unsafe { arg_mut(cfg, "cfg")? }.inner.set_idle_timeout_ms(ms);
        Ok(())
    })
}

/// Sets the most output bytes (prefixes included) queued per connection
/// (default 16 MiB). tf_send() past it returns TF_ERR_FULL and queues
/// nothing. 0 is TF_ERR_INVALID.
///
/// **Thread:** any thread, one at a time per configuration.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_max_queued_output(cfg: *mut tf_config, bytes: u64) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        unsafe { arg_mut(cfg, "cfg")? }.inner.set_max_queued_output(bytes)
    })
}

/// Sets how long tf_conn_close() waits for a connection's queued output to
/// be written (default 10000 ms). A peer that does not read within it is
/// reset; on_close still reports TF_CLOSE_LOCAL. 0 is TF_ERR_INVALID.
///
/// **Thread:** any thread, one at a time per configuration.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_close_timeout_ms(cfg: *mut tf_config, ms: u32) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        unsafe { arg_mut(cfg, "cfg")? }.inner.set_close_timeout_ms(ms)
    })
}

/// Sets the budget for the bytes of partial inbound frames held by all
/// connections of the server together (default 1 GiB, 1073741824). When a
/// read would take the total past it, the connection holding the most
/// partial-frame bytes is closed with TF_CLOSE_OVERLOAD. 0 is TF_ERR_INVALID.
/// Counted in bytes received and not yet delivered (prefixes included, and
/// bytes a pause holds back). A partial frame's buffer reserves at most
/// 64 KiB more than what arrived, so the memory held is at most the budget
/// plus 64 KiB per connection holding a partial frame.
///
/// **Thread:** any thread, one at a time per configuration.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_max_buffered(cfg: *mut tf_config, bytes: u64) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        unsafe { arg_mut(cfg, "cfg")? }.inner.set_max_buffered(bytes)
    })
}

/// TF_PREFIX_* flag: the length is big-endian (network byte order: DNS over
/// TCP, Thrift framed, Kafka, Erlang {packet,N}).
pub const TF_PREFIX_BIG_ENDIAN: u32 = 1;
/// TF_PREFIX_* flag: the length counts the prefix bytes too.
pub const TF_PREFIX_INCLUDES_ITSELF: u32 = 2;

const _: () = {
    assert!(crate::frame::BIG_ENDIAN == TF_PREFIX_BIG_ENDIAN);
    assert!(crate::frame::INCLUDES_ITSELF == TF_PREFIX_INCLUDES_ITSELF);
};

/// Sets the length prefix, for both directions and every connection of the
/// server (outbound ones too): `width` 1, 2, 4 or 8 bytes, `flags` a
/// combination of TF_PREFIX_BIG_ENDIAN and TF_PREFIX_INCLUDES_ITSELF.
/// Default: width 4, flags 0 (little-endian, payload length only).
/// Examples: DNS over TCP (2, TF_PREFIX_BIG_ENDIAN); Thrift framed and Kafka
/// (4, TF_PREFIX_BIG_ENDIAN); Erlang {packet,1|2|4} (N, TF_PREFIX_BIG_ENDIAN).
///
/// The largest payload is then min(max frame, C), C being what the prefix can
/// express: 2^(8*width) - 1 (255, 65535, 2^32 - 1, 2^64 - 1), or that minus
/// the width with TF_PREFIX_INCLUDES_ITSELF. tf_send of more is
/// TF_ERR_TOO_LARGE; a peer announcing more is closed with
/// TF_CLOSE_TOO_LARGE. With TF_PREFIX_INCLUDES_ITSELF, a prefix value smaller
/// than the width is impossible: that connection is closed with
/// TF_CLOSE_PROTOCOL.
///
/// Returns TF_OK; TF_ERR_INVALID for another width or an unknown flag bit
/// (the configuration is then unchanged), or NULL `cfg`.
///
/// **Thread:** any thread, one at a time per configuration.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_prefix(cfg: *mut tf_config, width: u32, flags: u32) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        unsafe { arg_mut(cfg, "cfg")? }.inner.set_prefix(width, flags)
    })
}

/// Sets the permission bits of the Unix socket file (e.g. 0660), applied
/// before the first connection can arrive. Default: what the umask gives.
/// Above 0777 is TF_ERR_INVALID. No effect on other transports.
///
/// **Thread:** any thread, one at a time per configuration.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_unix_mode(cfg: *mut tf_config, mode: u32) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        unsafe { arg_mut(cfg, "cfg")? }.inner.set_unix_mode(mode)
    })
}

/// Sets how long an outbound connection (tf_connect()) may take to be
/// established before it fails with TF_CLOSE_CONNECT_FAILED. Default 10000;
/// 0 is TF_ERR_INVALID.
///
/// **Thread:** any thread, one at a time per configuration.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_connect_timeout_ms(cfg: *mut tf_config, ms: u32) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        unsafe { arg_mut(cfg, "cfg")? }.inner.set_connect_timeout_ms(ms)
    })
}

/// PROXY protocol off (the default).
pub const TF_PROXY_OFF: i32 = 0;
/// PROXY protocol version 1 (text; HAProxy `send-proxy`).
pub const TF_PROXY_V1: i32 = 1;
/// PROXY protocol version 2 (binary; HAProxy `send-proxy-v2`, AWS NLB).
pub const TF_PROXY_V2: i32 = 2;
/// PROXY protocol, either version.
pub const TF_PROXY_ANY: i32 = 3;

/// Expects a PROXY protocol header (HAProxy's `send-proxy` /
/// `send-proxy-v2`, also AWS NLB, nginx stream, Envoy) at the start of every
/// accepted connection: TF_PROXY_OFF (default), TF_PROXY_V1, TF_PROXY_V2 or
/// TF_PROXY_ANY (either). It is read and removed before framing starts;
/// bytes after it in the same segment are the first frame's bytes.
/// on_connect's peer text is then the original client's address
/// ("203.0.113.7:41000", "[2001:db8::1]:41000"); a v2 LOCAL header (health
/// checks) or a v1 UNKNOWN one keeps the socket's own peer. TLVs are
/// skipped. A malformed header (closed as soon as its first bytes show it is
/// wrong), a missing one, or none complete within 5 seconds of the accept,
/// closes the connection before on_connect: it counts in
/// connections_rejected and no callback ever names it. Outbound connections
/// never carry a header. Another value is TF_ERR_INVALID.
///
/// **Thread:** any thread, one at a time per configuration.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_proxy_protocol(cfg: *mut tf_config, mode: i32) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        unsafe { arg_mut(cfg, "cfg")? }.inner.set_proxy_protocol(mode)
    })
}

/// Caps the open connections per client IP (the PROXY header's address when
/// PROXY protocol is on). Past it a new connection is accepted and closed at
/// once, counted as rejected, without on_connect. Default 0: no limit.
/// Unix-socket connections have no IP and are not counted.
///
/// **Thread:** any thread, one at a time per configuration.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_max_connections_per_ip(cfg: *mut tf_config, n: u32) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        unsafe { arg_mut(cfg, "cfg")? }.inner.max_connections_per_ip = n;
        Ok(())
    })
}

/// Sets the number of loop threads (default 1; 0 = one per CPU the process
/// may run on; above 256 is TF_ERR_INVALID). Each connection belongs to one
/// loop thread for its whole life, and all its callbacks run there, in
/// order; with n > 1, callbacks of connections on different threads run at
/// the same time (the library holds no lock across a callback): the host
/// locks what they share. The log callback is never called twice at the
/// same time. Connections are spread round-robin (connection ids go to
/// thread (id - 1) % n), accepted on one listening socket by thread 0 and
/// handed over: a second server on the same address still fails with
/// TF_ERR_IO. Max connections is a total; stats are totals; pull mode keeps
/// one event queue (each connection's events in order).
///
/// **Thread:** any thread, one at a time per configuration.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_threads(cfg: *mut tf_config, n: u32) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        unsafe { arg_mut(cfg, "cfg")? }.inner.set_threads(n)
    })
}

/// Chooses the event-loop backend: TF_BACKEND_AUTO (default), TF_BACKEND_POLL
/// or TF_BACKEND_EPOLL (Linux only). Any other value is TF_ERR_INVALID.
///
/// **Thread:** any thread, one at a time per configuration.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_backend(cfg: *mut tf_config, backend: i32) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        unsafe { arg_mut(cfg, "cfg")? }.inner.set_backend(backend)
    })
}

/// The host's log function and its user_data, both plain values.
struct LogTarget {
    log: unsafe extern "C" fn(*mut c_void, i32, *const c_char),
    user_data: *mut c_void,
}

impl LogTarget {
    fn call(&self, level: i32, text: &CString) {
        // SAFETY: calls the host's function as documented; the string lives
        // until it returns.
        unsafe { (self.log)(self.user_data, level, text.as_ptr()) }
    }
}

// SAFETY: the host promises, by setting a log function, that it may be
// called from a loop thread with this user_data (documented below).
unsafe impl Send for LogTarget {}
// SAFETY: the library never dereferences user_data. One server calls the
// function from its loop thread only; a configuration used for several
// servers shares it between their loop threads, which the documentation
// below requires the host's function to allow.
unsafe impl Sync for LogTarget {}

/// Routes the library's diagnostics (accept failures, descriptor
/// exhaustion, connections closed for cause, internal errors) to `log`,
/// with a TF_LOG_* level. Rate limited: at most 20 lines per second, then
/// a count of what was suppressed. NULL `log` turns logging off (the default).
///
/// **Thread:** `log` is called on the server's loop thread, never
/// concurrently for one server; if the same configuration starts several
/// servers, their loop threads may call it at the same time. It must not
/// call tf_server_stop().
/// **Ownership:** `msg` is valid during the call only; `user_data` is
/// passed back untouched and must stay valid until the server is stopped.
#[no_mangle]
pub unsafe extern "C" fn tf_config_set_log(
    cfg: *mut tf_config,
    log: Option<unsafe extern "C" fn(user_data: *mut c_void, level: i32, msg: *const c_char)>,
    user_data: *mut c_void,
) -> i32 {
    guard(|| {
        // SAFETY: `cfg` is NULL or a live tf_config.
        let cfg = unsafe { arg_mut(cfg, "cfg")? };
        cfg.inner.log = match log {
            None => None,
            Some(log) => {
                let target = LogTarget { log, user_data };
                Some(Arc::new(move |level: LogLevel, msg: &str| {
                    let text = CString::new(msg.replace('\0', " ")).unwrap_or_default();
                    target.call(level as i32, &text)
                }))
            }
        };
        Ok(())
    })
}
