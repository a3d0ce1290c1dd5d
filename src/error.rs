//! Errors as the C API reports them: a TF_ERR_* code and a message a user
//! can act on.

// Safe Rust only: unsafe code lives in src/ffi/ and src/sys/.
#![forbid(unsafe_code)]

use std::fmt;

/// The C API's TF_ERR_* codes (TF_OK is 0 and has no variant).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Code {
    Invalid = 1,
    NoConn = 2,
    Full = 3,
    TooLarge = 4,
    Stopped = 5,
    Io = 6,
    Internal = 7,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub code: Code,
    pub message: String,
}

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Error {
        Error { code, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(Code::Invalid, message)
    }
    pub fn io(context: impl fmt::Display, err: std::io::Error) -> Error {
        Error::new(Code::Io, format!("{context}: {err}"))
    }
    pub fn stopped() -> Error {
        Error::new(Code::Stopped, "the server is stopping or stopped")
    }
    pub fn forked() -> Error {
        Error::new(
            Code::Stopped,
            "this server was started before fork(): it is unusable in the child process \
             (its loop thread does not exist here); start servers after forking",
        )
    }
    pub fn no_conn(id: u64) -> Error {
        Error::new(Code::NoConn, format!("connection {id} is unknown or already closed"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
