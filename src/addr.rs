//! Addresses as the C API spells them: "IPv4:port", "[IPv6]:port",
//! "unix:/path", "unix:@abstract", "fd:N" and "none"; parsed and printed.

// Safe Rust only: unsafe code lives in src/ffi/ and src/sys/.
#![forbid(unsafe_code)]

use crate::error::{Error, Result};
use std::fmt;
use std::net::SocketAddr;

/// Longest Unix socket name (sun_path holds 108 bytes with its NUL).
pub const UNIX_MAX: usize = 107;

/// A Unix socket's name: a file, or a Linux abstract name (no file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnixName {
    Path(Vec<u8>),
    Abstract(Vec<u8>),
}

/// Where a server listens, or where tf_connect goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Tcp(SocketAddr),
    Unix(UnixName),
    /// An inherited, already listening descriptor (listen side only).
    Fd(i32),
    /// No listener (listen side only): the server only connects out.
    None,
}

impl Address {
    /// Parses a listening address (every form).
    pub fn parse_listen(text: &str) -> Result<Address> {
        if text == "none" {
            return Ok(Address::None);
        }
        if let Some(n) = text.strip_prefix("fd:") {
            let fd: i32 =
                n.parse().ok().filter(|&fd| fd >= 0 && !n.starts_with('+')).ok_or_else(|| {
                    Error::invalid(format!("address {text:?}: fd:N needs a descriptor number"))
                })?;
            return Ok(Address::Fd(fd));
        }
        Address::parse_connect(text)
    }

    /// Parses an address tf_connect can reach: TCP or Unix. Host names are
    /// not resolved.
    pub fn parse_connect(text: &str) -> Result<Address> {
        if let Some(rest) = text.strip_prefix("unix:") {
            let (name, bytes) = match rest.strip_prefix('@') {
                Some(abs) => (UnixName::Abstract(abs.as_bytes().to_vec()), abs.len()),
                None => (UnixName::Path(rest.as_bytes().to_vec()), rest.len()),
            };
            if bytes == 0 || bytes > UNIX_MAX || rest.contains('\0') {
                return Err(Error::invalid(format!(
                    "address {text:?}: a Unix socket name is 1 to {UNIX_MAX} bytes, with no NUL"
                )));
            }
            return Ok(Address::Unix(name));
        }
        text.parse::<SocketAddr>().map(Address::Tcp).map_err(|_| {
            Error::invalid(format!(
                "address {text:?} is not IP:PORT, [IPv6]:PORT, unix:/path, unix:@name, fd:N or none \
                 (host names are not resolved)"
            ))
        })
    }

    /// The TCP address, if it is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            Address::Tcp(a) => Some(*a),
            _ => None,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Unix(UnixName::Path(p)) => write!(f, "unix:{}", String::from_utf8_lossy(p)),
            Address::Unix(UnixName::Abstract(n)) => write!(f, "unix:@{}", String::from_utf8_lossy(n)),
            Address::Fd(fd) => write!(f, "fd:{fd}"),
            Address::None => f.write_str("none"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_and_prints_back() {
        for text in
            ["127.0.0.1:5882", "[::1]:0", "unix:/tmp/x.sock", "unix:@name", "fd:3", "none", "unix:rel.sock"]
        {
            assert_eq!(Address::parse_listen(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn names_too_long_empty_or_unresolved_are_refused() {
        let long = format!("unix:/{}", "a".repeat(UNIX_MAX));
        let just = format!("unix:/{}", "a".repeat(UNIX_MAX - 1));
        assert!(Address::parse_listen(&long).is_err());
        assert!(Address::parse_listen(&just).is_ok());
        assert!(Address::parse_listen(&format!("unix:@{}", "b".repeat(UNIX_MAX))).is_ok());
        assert!(Address::parse_listen(&format!("unix:@{}", "b".repeat(UNIX_MAX + 1))).is_err());
        for bad in ["unix:", "unix:@", "fd:", "fd:-1", "fd:x", "fd:+3", "localhost:80", "", "nonE"] {
            assert!(Address::parse_listen(bad).is_err(), "{bad:?}");
        }
        assert!(Address::parse_connect("fd:3").is_err());
        assert!(Address::parse_connect("none").is_err());
    }
}
