//! The PROXY protocol header, read before framing starts: parsed as it
//! arrives, bounded in time; the host hears of the connection only once it is
//! complete (on_connect with the client's address), or never.

#![forbid(unsafe_code)]

use super::log::Topic;
use super::{is_reset, would_block, EventLoop, Handler};
use crate::config::LogLevel;
use crate::proxy::Outcome;
use crate::shared::bump;
use crate::sys;
use std::time::Instant;

impl<H: Handler> EventLoop<H> {
    /// Reads what the peer sent while its PROXY header is due.
    pub(super) fn read_proxy_header(&mut self, slot: u32, id: u64, fd: i32) {
        let n = match sys::recv(fd, &mut self.scratch) {
            Ok(0) => return self.drop_unannounced(slot, id, "closed before its PROXY header was complete"),
            Ok(n) => n,
            Err(e) if would_block(&e) => return,
            Err(e) => {
                let why = if is_reset(&e) { "reset" } else { "read error" };
                return self.drop_unannounced(slot, id, why);
            }
        };
        bump(&self.shared.stats.bytes_received, n as u64);
        let outcome = {
            let mut st = self.state.borrow_mut();
            let Some(c) = st.get_id(slot, id) else { return };
            crate::shared::bump(&c.shared.bytes_received, n as u64);
            let parser = c.proxy.as_mut().expect("a PROXY header is due");
            parser.feed(&self.scratch[..n])
        };
        match outcome {
            Outcome::NeedMore => {}
            Outcome::Invalid(why) => self.drop_unannounced(slot, id, why),
            Outcome::Done { consumed, source } => {
                let (peer, ip) = {
                    let mut st = self.state.borrow_mut();
                    let c = st.get_id(slot, id).expect("checked above");
                    c.proxy = None;
                    let own = c.socket_peer.take().unwrap_or_else(|| (String::from("unknown"), None));
                    // LOCAL (health checks) and UNKNOWN keep the socket's own peer.
                    let peer = source.map_or(own, |a| (a.to_string(), Some(a.ip())));
                    st.idle_touch(slot, Instant::now());
                    peer
                };
                if !self.announce(slot, id, peer, ip) {
                    return;
                }
                if consumed < n {
                    // The first frame's bytes came in the same segment.
                    self.deliver_read(slot, id, consumed..n, Instant::now());
                } else {
                    self.sync_interest(slot);
                }
            }
        }
    }

    /// A connection whose PROXY header is bad, missing or late: closed
    /// before on_connect, counted as rejected, never named to the host.
    fn drop_unannounced(&mut self, slot: u32, id: u64, why: &str) {
        self.log.log(Topic::Frame, LogLevel::Warn, || {
            format!("tcpframe: a connection was refused before on_connect: PROXY header: {why}")
        });
        self.reject(slot, id);
    }

    /// Headers not complete within the deadline after the accept.
    pub(super) fn expire_proxy_headers(&mut self, now: Instant) {
        loop {
            let due = {
                let mut st = self.state.borrow_mut();
                match st.proxy_deadlines.front().copied() {
                    Some((deadline, slot, id)) if deadline <= now => {
                        st.proxy_deadlines.pop_front();
                        st.get(slot).filter(|c| c.id == id && c.proxy.is_some()).map(|_| (slot, id))
                    }
                    _ => break,
                }
            };
            if let Some((slot, id)) = due {
                self.drop_unannounced(slot, id, "not complete within 5 seconds");
            }
        }
    }
}
