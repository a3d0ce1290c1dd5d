//! Thin socket wrappers: listen, accept4, recv, send with MSG_NOSIGNAL.
//! Every descriptor is created non-blocking and close-on-exec.

use super::{cvt, cvt_size, retry};
use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The descriptor number of an owned descriptor.
pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

pub(super) fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

pub(super) fn from_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Creates a non-blocking listening socket bound to `addr` and returns it with
/// the address actually bound (the port chosen when `addr` asked for port 0).
/// SO_REUSEADDR is set (restart after TIME_WAIT); SO_REUSEPORT never is.
pub fn listen(addr: &SocketAddr, backlog: i32) -> io::Result<(OwnedFd, SocketAddr)> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = cvt(unsafe {
        libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    })?;
    // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int_opt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: small
    // replies never wait for Nagle, at no system call per connection.
    set_int_opt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    let (storage, len) = to_sockaddr(addr);
    // SAFETY: `storage` holds a valid sockaddr of length `len`.
    cvt(unsafe { libc::bind(fd.as_raw_fd(), &storage as *const _ as *const libc::sockaddr, len) })?;
    // SAFETY: plain listen(2) on a socket we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut bound: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut blen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `bound` has room for `blen` bytes, as getsockname requires.
    cvt(unsafe {
        libc::getsockname(fd.as_raw_fd(), &mut bound as *mut _ as *mut libc::sockaddr, &mut blen)
    })?;
    let local = from_sockaddr(&bound).unwrap_or(*addr);
    Ok((fd, local))
}

/// An accepted connection: its descriptor (non-blocking, close-on-exec) and peer.
pub struct Accepted {
    pub fd: OwnedFd,
    pub peer: Option<SocketAddr>,
}

/// accept4(2) once. EAGAIN, EMFILE and friends come back as errors for the caller.
pub fn accept(listener: RawFd) -> io::Result<Accepted> {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let fd = retry(|| {
        let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: `storage` has room for `len` bytes.
        cvt(unsafe {
            libc::accept4(
                listener,
                &mut storage as *mut _ as *mut libc::sockaddr,
                &mut len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        })
    })?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(Accepted { fd, peer: from_sockaddr(&storage) })
}

/// Stops a listening socket listening without closing it (shutdown(2) with
/// SHUT_RD): from then on connection attempts are refused, TCP and Unix
/// alike; connections still in its queue are reset, so take them first.
pub fn stop_listening(listener: RawFd) -> io::Result<()> {
    // SAFETY: shutdown(2) only reads its integer arguments; on a descriptor
    // that is not a socket it fails with ENOTSOCK.
    cvt(unsafe { libc::shutdown(listener, libc::SHUT_RD) }).map(|_| ())
}

/// Sets TCP_NODELAY (for sockets accepted on an inherited listener).
pub fn set_nodelay(fd: RawFd) -> io::Result<()> {
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)
}

/// Whether TCP_NODELAY is set (tests check that accepted sockets inherit it).
pub fn nodelay(fd: RawFd) -> io::Result<bool> {
    Ok(int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY)? != 0)
}

/// An integer socket option.
pub(super) fn int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are live and sized for the option.
    cvt(unsafe { libc::getsockopt(fd, level, name, &mut v as *mut _ as *mut libc::c_void, &mut len) })?;
    Ok(v)
}

/// recv(2) into `buf`, retrying EINTR. Ok(0) is end of stream.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    retry(|| {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        cvt_size(unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) })
    })
}

/// send(2) with MSG_NOSIGNAL (never SIGPIPE in the host), retrying EINTR.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    retry(|| {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
        cvt_size(unsafe {
            libc::send(
                fd,
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        })
    })
}

/// sendmsg(2) of several buffers at once, with MSG_NOSIGNAL, retrying EINTR.
pub fn sendv(fd: RawFd, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    retry(|| {
        // SAFETY: msghdr is plain old data; all-zero is a valid value.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        // IoSlice is guaranteed ABI-compatible with struct iovec on Unix.
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len() as _;
        // SAFETY: `msg` points to `bufs.len()` live iovecs for the call.
        cvt_size(unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) })
    })
}

/// Makes the coming close(2) a reset (SO_LINGER on, 0 s): queued data is
/// dropped at once instead of lingering for a peer that does not read.
pub fn set_linger_zero(fd: RawFd) -> io::Result<()> {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: passes a pointer to a live linger and its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Reads and throws away what the peer already sent (bounded by `max_reads`),
/// so that closing does not turn into a reset that destroys our last replies.
/// Returns the bytes discarded and whether end of stream was seen.
pub fn discard_input(fd: RawFd, scratch: &mut [u8], max_reads: usize) -> (u64, bool) {
    let mut total = 0u64;
    for _ in 0..max_reads {
        match recv(fd, scratch) {
            Ok(0) => return (total, true),
            Ok(n) => total += n as u64,
            Err(_) => return (total, false),
        }
    }
    (total, false)
}
