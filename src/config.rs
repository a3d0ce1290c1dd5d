//! Server configuration: the builder behind tf_config, validated on every set.

// Safe Rust only: unsafe code lives in src/ffi/ and src/sys/.
#![forbid(unsafe_code)]

use crate::addr::Address;
use crate::error::{Error, Result};
use crate::frame::Format;
use crate::proxy::Mode as ProxyMode;
use crate::sys::Backend;
use std::fmt;
use std::sync::Arc;

/// TF_LOG_* levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(i32)]
pub enum LogLevel {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

/// Where the library's diagnostics go: called on the loop thread.
pub type LogSink = Arc<dyn Fn(LogLevel, &str) + Send + Sync>;

#[derive(Clone)]
pub struct Config {
    pub address: Address,
    /// Permission bits of a Unix socket file (None: what the umask gives).
    pub unix_mode: Option<u32>,
    /// How long tf_connect may take before TF_CLOSE_CONNECT_FAILED.
    pub connect_timeout_ms: u32,
    pub max_connections: u32,
    pub max_frame: u32,
    pub idle_timeout_ms: u32,
    pub max_queued_output: u64,
    /// How long a tf_conn_close waits for queued output before a reset.
    pub close_timeout_ms: u32,
    /// Budget for partial inbound frames, all connections together.
    pub max_buffered: u64,
    /// The length prefix, both directions.
    pub prefix: Format,
    /// PROXY protocol header expected on every accepted connection.
    pub proxy: Option<ProxyMode>,
    /// Open connections per client IP (0: no limit).
    pub max_connections_per_ip: u32,
    /// Loop threads (0: one per CPU the process may run on).
    pub threads: u32,
    /// Slow-consumer policy: (soft limit in bytes, seconds); None: off.
    pub slow_consumer: Option<(u64, u32)>,
    /// The host wants to learn when a full queue has room again
    /// (on_writable, or TF_EVENT_WRITABLE in pull mode).
    pub writable_events: bool,
    /// None: the platform's best (epoll on Linux).
    pub backend: Option<Backend>,
    pub log: Option<LogSink>,
}

pub const DEFAULT_ADDRESS: &str = "127.0.0.1:5882";
/// Most loop threads a server may have.
pub const MAX_THREADS: u32 = 256;

impl Default for Config {
    fn default() -> Config {
        Config {
            address: Address::parse_listen(DEFAULT_ADDRESS).expect("default address parses"),
            unix_mode: None,
            connect_timeout_ms: 10_000,
            max_connections: 4096,
            max_frame: 8 * 1024 * 1024,
            idle_timeout_ms: 0,
            max_queued_output: 16 * 1024 * 1024,
            close_timeout_ms: 10_000,
            max_buffered: 1 << 30,
            prefix: Format::default(),
            proxy: None,
            max_connections_per_ip: 0,
            threads: 1,
            slow_consumer: None,
            writable_events: false,
            backend: None,
            log: None,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("address", &self.address)
            .field("unix_mode", &self.unix_mode)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("max_connections", &self.max_connections)
            .field("max_frame", &self.max_frame)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("max_queued_output", &self.max_queued_output)
            .field("close_timeout_ms", &self.close_timeout_ms)
            .field("max_buffered", &self.max_buffered)
            .field("prefix", &self.prefix)
            .field("proxy", &self.proxy)
            .field("max_connections_per_ip", &self.max_connections_per_ip)
            .field("threads", &self.threads)
            .field("slow_consumer", &self.slow_consumer)
            .field("writable_events", &self.writable_events)
            .field("backend", &self.backend)
            .field("log", &self.log.is_some())
            .finish()
    }
}

impl Config {
    pub fn set_address(&mut self, text: &str) -> Result<()> {
        self.address = Address::parse_listen(text)?;
        Ok(())
    }

    /// Permission bits for a Unix socket file; above 0777 is refused.
    pub fn set_unix_mode(&mut self, mode: u32) -> Result<()> {
        if mode > 0o777 {
            return Err(Error::invalid(format!("unix mode {mode:#o} is above 0777")));
        }
        self.unix_mode = Some(mode);
        Ok(())
    }

    pub fn set_connect_timeout_ms(&mut self, ms: u32) -> Result<()> {
        if ms == 0 {
            return Err(Error::invalid("connect timeout must be at least 1 ms"));
        }
        self.connect_timeout_ms = ms;
        Ok(())
    }

    pub fn set_max_connections(&mut self, n: u32) -> Result<()> {
        if n == 0 {
            return Err(Error::invalid("max connections must be at least 1"));
        }
        self.max_connections = n;
        Ok(())
    }

    pub fn set_max_frame(&mut self, bytes: u32) -> Result<()> {
        if bytes == 0 {
            return Err(Error::invalid("max frame must be at least 1 byte"));
        }
        self.max_frame = bytes;
        Ok(())
    }

    pub fn set_idle_timeout_ms(&mut self, ms: u32) {
        self.idle_timeout_ms = ms;
    }

    pub fn set_max_queued_output(&mut self, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Err(Error::invalid("max queued output must be at least 1 byte"));
        }
        self.max_queued_output = bytes;
        Ok(())
    }

    pub fn set_close_timeout_ms(&mut self, ms: u32) -> Result<()> {
        if ms == 0 {
            return Err(Error::invalid("close timeout must be at least 1 ms"));
        }
        self.close_timeout_ms = ms;
        Ok(())
    }

    pub fn set_max_buffered(&mut self, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Err(Error::invalid("max buffered must be at least 1 byte"));
        }
        self.max_buffered = bytes;
        Ok(())
    }

    /// Loop threads: 1..=256, or 0 for one per CPU the process may run on.
    pub fn set_threads(&mut self, n: u32) -> Result<()> {
        if n > MAX_THREADS {
            return Err(Error::invalid(format!("{n} loop threads: at most {MAX_THREADS}")));
        }
        self.threads = n;
        Ok(())
    }

    /// The number of loop threads to start.
    pub fn resolved_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_THREADS as usize),
            n => n as usize,
        }
    }

    /// TF_PROXY_OFF (0), V1 (1), V2 (2), ANY (3).
    pub fn set_proxy_protocol(&mut self, mode: i32) -> Result<()> {
        self.proxy = match mode {
            0 => None,
            1 => Some(ProxyMode::V1),
            2 => Some(ProxyMode::V2),
            3 => Some(ProxyMode::Any),
            other => {
                return Err(Error::invalid(format!(
                    "unknown PROXY protocol mode {other} (0 off, 1 v1, 2 v2, 3 any)"
                )))
            }
        };
        Ok(())
    }

    /// tf_config_set_prefix: width 1, 2, 4 or 8; TF_PREFIX_* flags.
    pub fn set_prefix(&mut self, width: u32, flags: u32) -> Result<()> {
        self.prefix = Format::new(width, flags).ok_or_else(|| {
            Error::invalid(format!(
                "prefix width {width} with flags {flags:#x}: the width must be 1, 2, 4 or 8 and the flags \
                 TF_PREFIX_BIG_ENDIAN (1) and/or TF_PREFIX_INCLUDES_ITSELF (2)"
            ))
        })?;
        Ok(())
    }

    /// The largest payload in and out: max frame, or less when the prefix
    /// cannot express it.
    pub fn effective_max_frame(&self) -> u32 {
        (self.max_frame as u64).min(self.prefix.max_payload()) as u32
    }

    /// (0, 0) turns it off; a soft limit with 0 seconds is refused.
    pub fn set_slow_consumer(&mut self, soft_bytes: u64, seconds: u32) -> Result<()> {
        self.slow_consumer = match (soft_bytes, seconds) {
            (0, 0) => None,
            (_, 0) => {
                return Err(Error::invalid(
                    "slow consumer: a soft limit needs a number of seconds above 0 (0, 0 turns it off)",
                ))
            }
            (soft, secs) => Some((soft, secs)),
        };
        Ok(())
    }

    /// 0 auto, 1 poll, 2 epoll (Linux only).
    pub fn set_backend(&mut self, backend: i32) -> Result<()> {
        self.backend = match backend {
            0 => None,
            1 => Some(Backend::Poll),
            2 if cfg!(target_os = "linux") => Some(Backend::Epoll),
            2 => return Err(Error::invalid("the epoll backend exists only on Linux")),
            other => {
                return Err(Error::invalid(format!("unknown backend {other} (0 auto, 1 poll, 2 epoll)")))
            }
        };
        Ok(())
    }

    pub fn resolved_backend(&self) -> Backend {
        self.backend.unwrap_or(if cfg!(target_os = "linux") { Backend::Epoll } else { Backend::Poll })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::default();
        assert_eq!(c.address.to_string(), "127.0.0.1:5882");
        assert_eq!(c.max_connections, 4096);
        assert_eq!(c.max_frame, 8_388_608);
        assert_eq!(c.idle_timeout_ms, 0);
        assert_eq!(c.max_queued_output, 16 << 20);
        assert_eq!(c.close_timeout_ms, 10_000);
        assert_eq!(c.max_buffered, 1 << 30);
    }

    #[test]
    fn zero_limits_are_refused_and_leave_the_config_unchanged() {
        let mut c = Config::default();
        assert!(c.set_max_connections(0).is_err());
        assert!(c.set_max_frame(0).is_err());
        assert!(c.set_max_queued_output(0).is_err());
        assert!(c.set_close_timeout_ms(0).is_err());
        assert!(c.set_max_buffered(0).is_err());
        assert_eq!(c.close_timeout_ms, 10_000);
        assert_eq!(c.max_buffered, 1 << 30);
        assert_eq!(c.max_connections, 4096);
        assert_eq!(c.max_frame, 8_388_608);
        assert!(c.set_max_frame(u32::MAX).is_ok());
    }

    #[test]
    fn addresses_parse_for_both_families_and_garbage_is_refused() {
        let mut c = Config::default();
        c.set_address("[::1]:0").unwrap();
        assert!(c.address.tcp().unwrap().is_ipv6());
        c.set_address("0.0.0.0:9000").unwrap();
        assert_eq!(c.address.tcp().unwrap().port(), 9000);
        for bad in ["", "127.0.0.1", "localhost:80", "1.2.3.4:99999", "[::1]", " 127.0.0.1:80"] {
            assert!(c.set_address(bad).is_err(), "{bad:?}");
        }
        assert_eq!(c.address.tcp().unwrap().port(), 9000);
    }

    #[test]
    fn unknown_backends_are_refused() {
        let mut c = Config::default();
        assert!(c.set_backend(3).is_err());
        assert!(c.set_backend(-1).is_err());
        c.set_backend(1).unwrap();
        assert_eq!(c.resolved_backend(), Backend::Poll);
    }
}
