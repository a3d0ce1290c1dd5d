//! Unix stream sockets and the other transports' system calls: listening on
//! a path or an abstract name (with the stale-socket rule and the mode),
//! peer credentials, inherited listeners (fd:N), and outbound connects.

use super::socket::int_opt;
use super::{cvt, retry};
use crate::addr::{Address, UnixName};
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The socket file a server created: removed at stop only while it is
/// still that file (same device and inode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketFile {
    pub path: Vec<u8>,
    dev: u64,
    ino: u64,
}

fn c_path(path: &[u8]) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn lstat(path: &[u8]) -> io::Result<libc::stat> {
    let p = c_path(path)?;
    // SAFETY: stat is plain old data; all-zero is valid.
    let mut st: libc::stat = unsafe { mem::zeroed() };
    // SAFETY: `p` is NUL-terminated, `st` is writable.
    cvt(unsafe { libc::lstat(p.as_ptr(), &mut st) })?;
    Ok(st)
}

fn unix_sockaddr(name: &UnixName) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all-zero is valid.
    let mut sa: libc::sockaddr_un = unsafe { mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let base = mem::size_of::<libc::sa_family_t>();
    // A path needs its terminating NUL; an abstract name its leading one.
    let (bytes, offset): (&[u8], usize) = match name {
        UnixName::Path(p) => (p, 0),
        UnixName::Abstract(n) => (n, 1), // sun_path[0] stays NUL
    };
    if bytes.len() + 1 > sa.sun_path.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (i, &b) in bytes.iter().enumerate() {
        sa.sun_path[offset + i] = b as libc::c_char;
    }
    let len = match name {
        UnixName::Path(p) => base + p.len() + 1,
        UnixName::Abstract(n) => base + 1 + n.len(),
    };
    Ok((sa, len as libc::socklen_t))
}

fn unix_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = cvt(unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    })?;
    // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Is something listening on this Unix socket? (A non-blocking connect: a
/// dead socket file answers ECONNREFUSED at once.)
fn unix_alive(name: &UnixName) -> bool {
    let Ok(fd) = unix_socket() else { return true };
    let Ok((sa, len)) = unix_sockaddr(name) else { return true };
    // SAFETY: `sa` is a valid sockaddr_un of length `len`.
    let r = unsafe { libc::connect(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ECONNREFUSED)
}

/// Binds and listens on a Unix socket. An existing path is replaced only
/// when it is a socket nobody listens on (left by a dead process); a live
/// socket or any other file there is an error and nothing is deleted.
/// `mode` is applied to the file before listen(2), so before any
/// connection can arrive.
pub fn listen_unix(
    name: &UnixName,
    mode: Option<u32>,
    backlog: i32,
) -> io::Result<(OwnedFd, Option<SocketFile>)> {
    if let UnixName::Path(path) = name {
        if let Ok(st) = lstat(path) {
            if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is there",
                ));
            }
            if unix_alive(name) {
                return Err(io::Error::from_raw_os_error(libc::EADDRINUSE));
            }
            let p = c_path(path)?;
            // SAFETY: `p` is NUL-terminated.
            cvt(unsafe { libc::unlink(p.as_ptr()) })?;
        }
    }
    let fd = unix_socket()?;
    let (sa, len) = unix_sockaddr(name)?;
    // SAFETY: `sa` is a valid sockaddr_un of length `len`.
    cvt(unsafe { libc::bind(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) })?;
    let file = match name {
        UnixName::Path(path) => {
            let st = lstat(path)?;
            let file = SocketFile { path: path.clone(), dev: st.st_dev, ino: st.st_ino };
            if let Some(mode) = mode {
                let p = c_path(path)?;
                // SAFETY: `p` is NUL-terminated.
                if let Err(e) = cvt(unsafe { libc::chmod(p.as_ptr(), mode as libc::mode_t) }) {
                    remove_socket_file(&file);
                    return Err(e);
                }
            }
            Some(file)
        }
        UnixName::Abstract(_) => None,
    };
    // SAFETY: plain listen(2) on a socket we own.
    if let Err(e) = cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) }) {
        if let Some(f) = &file {
            remove_socket_file(f);
        }
        return Err(e);
    }
    Ok((fd, file))
}

/// Removes the socket file if it is still the one we created.
pub fn remove_socket_file(file: &SocketFile) {
    if let Ok(st) = lstat(&file.path) {
        if st.st_dev == file.dev && st.st_ino == file.ino && st.st_mode & libc::S_IFMT == libc::S_IFSOCK {
            if let Ok(p) = c_path(&file.path) {
                // SAFETY: `p` is NUL-terminated.
                unsafe { libc::unlink(p.as_ptr()) };
            }
        }
    }
}

/// The connecting process of an accepted Unix connection (SO_PEERCRED).
pub fn peer_cred(fd: RawFd) -> io::Result<(i32, u32, u32)> {
    // SAFETY: ucred is plain old data; all-zero is valid.
    let mut cred: libc::ucred = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live and sized for the option.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut _ as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok((cred.pid, cred.uid, cred.gid))
}

/// Checks that `fd` is a listening stream socket (fd:N). Takes nothing: the
/// caller adopts it only once the server has started.
pub fn check_inherited_listener(fd: RawFd) -> io::Result<()> {
    let ty = int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE)?;
    let listening = int_opt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)?;
    if ty != libc::SOCK_STREAM || listening == 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

/// Takes ownership of an inherited descriptor (fd:N) once the server has
/// checked it: from here on the server closes it at stop.
pub fn adopt(fd: RawFd) -> OwnedFd {
    // SAFETY: fd:N's contract: the host hands the descriptor over on a
    // successful start, and nothing else closes it afterwards.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The address a listening socket is bound to (for fd:N's port).
pub fn local_addr(fd: RawFd) -> Option<std::net::SocketAddr> {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` has room for `len` bytes.
    let r = unsafe { libc::getsockname(fd, &mut storage as *mut _ as *mut libc::sockaddr, &mut len) };
    if r != 0 {
        return None;
    }
    super::socket::from_sockaddr(&storage)
}

/// Makes an adopted descriptor non-blocking and close-on-exec.
pub fn set_nonblocking_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller holds.
    let fl = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) })?;
    // SAFETY: as above.
    let fdfl = cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, fdfl | libc::FD_CLOEXEC) })?;
    Ok(())
}

/// Starts connecting to `addr` (TCP or Unix), non-blocking. Ok(true): done
/// already; Ok(false): in progress (wait for writability, then
/// `connect_result`).
pub fn connect(addr: &Address) -> io::Result<(OwnedFd, bool)> {
    let (fd, r) = match addr {
        Address::Tcp(a) => {
            let family = if a.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
            // SAFETY: plain socket(2) call; the result is checked before use.
            let fd = cvt(unsafe {
                libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
            })?;
            // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // Small frames never wait for Nagle.
            let _ = super::socket::set_nodelay(fd.as_raw_fd());
            let (storage, len) = super::socket::to_sockaddr(a);
            let r = retry(|| {
                // SAFETY: `storage` holds a valid sockaddr of length `len`.
                cvt(unsafe {
                    libc::connect(fd.as_raw_fd(), &storage as *const _ as *const libc::sockaddr, len)
                })
            });
            (fd, r)
        }
        Address::Unix(name) => {
            let fd = unix_socket()?;
            let (sa, len) = unix_sockaddr(name)?;
            let r = retry(|| {
                // SAFETY: `sa` is a valid sockaddr_un of length `len`.
                cvt(unsafe { libc::connect(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) })
            });
            // A Unix connect never completes later: EAGAIN (backlog full) fails.
            (fd, r)
        }
        Address::Fd(_) | Address::None => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    match r {
        Ok(_) => Ok((fd, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) && addr.tcp().is_some() => Ok((fd, false)),
        Err(e) => Err(e),
    }
}

/// The outcome of a connect that was in progress (SO_ERROR).
pub fn connect_result(fd: RawFd) -> io::Result<()> {
    match int_opt(fd, libc::SOL_SOCKET, libc::SO_ERROR)? {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}
