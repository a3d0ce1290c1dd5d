//! The calls host threads make on a running server: sends (one, batched,
//! gathered, fanned out), close and abort, pause and resume, user data,
//! connection info, stats. Each takes the no-lock path inside a callback of
//! the server's own loop thread, and the inbox otherwise.

// Safe Rust only: unsafe code lives in src/ffi/ and src/sys/.
#![forbid(unsafe_code)]

use super::Server;
use crate::conn::ConnShared;
use crate::error::{Code, Error, Result};
use crate::event_loop;
use crate::outq::Frame;
use crate::shared::{too_large, StatsSnapshot};
use std::sync::atomic::Ordering;

/// Runs a call on the loop's own table when inside one of its callbacks (no
/// lock). None: not on that loop's thread, or NO_CONN for an id the table
/// does not hold at all: one that tf_connect made from this very callback
/// waits in the inbox until the loop's next pass, so the host path (which
/// knows it) decides. Connections that are gone are unknown there too; ones
/// still in the table (closing) keep the local answer.
#[inline]
fn local_call<T>(
    sh: &crate::shared::Shared,
    id: u64,
    f: impl FnOnce(&mut event_loop::State) -> Result<T>,
) -> Option<Result<T>> {
    event_loop::with_state(sh, |st| {
        let r = f(st);
        st.unless_unknown(id, r)
    })
    .flatten()
}

impl Server {
    pub fn send(&self, id: u64, payload: &[u8]) -> Result<()> {
        self.send_with(id, || Ok(payload))
    }

    /// tf_send: the payload is fetched only after the process and stop
    /// checks, which take precedence over argument errors.
    pub fn send_with<'a>(&self, id: u64, payload: impl FnOnce() -> Result<&'a [u8]>) -> Result<()> {
        self.check_process()?;
        let sh = self.route(id);
        if sh.stopping.load(Ordering::Acquire) {
            return Err(Error::stopped());
        }
        let payload = payload()?;
        if payload.len() > sh.max_frame as usize {
            return Err(too_large(payload.len(), sh.max_frame));
        }
        #[cfg(feature = "fault-injection")]
        if payload == crate::shared::PANIC_PAYLOAD {
            panic!("fault injection: panic inside tf_send");
        }
        match local_call(sh, id, |st| st.send(id, payload)) {
            Some(r) => r,
            None => sh.send_pending(id, Frame::One(payload)),
        }
    }

    /// Ok while calls may still queue frames: the right process, no stop.
    pub fn check_live(&self) -> Result<()> {
        self.check_process()?;
        if self.first().stopping.load(Ordering::Acquire) {
            return Err(Error::stopped());
        }
        Ok(())
    }

    /// tf_send_batch: each entry as tf_send would treat it, in order; one
    /// code per entry. Err (and nothing queued) once stop has begun.
    pub fn send_batch(&self, entries: &[(u64, Result<&[u8]>)]) -> Result<Vec<i32>> {
        self.check_live()?;
        let max_frame = self.first().max_frame;
        let check = |p: &Result<&[u8]>| -> Result<()> {
            let p = p.as_ref().map_err(Clone::clone)?;
            if p.len() > max_frame as usize {
                return Err(too_large(p.len(), max_frame));
            }
            Ok(())
        };
        let code = |r: Result<()>| r.map_or_else(|e| e.code as i32, |()| 0);
        let mut codes = Vec::new();
        codes
            .try_reserve_exact(entries.len())
            .map_err(|_| Error::new(Code::Full, "no memory for the batch"))?;
        // Runs of entries for one loop: without a lock on that loop's own
        // thread, under one lock of its inbox elsewhere.
        for run in self.runs(entries, |e| e.0) {
            let sh = self.route(run[0].0);
            let local = event_loop::with_state(sh, |st| {
                let mut unknown = Vec::new();
                for (i, (id, p)) in run.iter().enumerate() {
                    let r = check(p).and_then(|()| st.send(*id, p.as_ref().expect("checked")));
                    match st.unless_unknown(*id, r) {
                        Some(r) => codes.push(code(r)),
                        None => {
                            codes.push(Code::NoConn as i32);
                            unknown.push(i);
                        }
                    }
                }
                unknown
            });
            if let Some(unknown) = local {
                // Not in the loop's table: perhaps connecting (local_call).
                let from = codes.len() - run.len();
                for i in unknown {
                    let (id, p) = &run[i];
                    let frame = Frame::One(p.as_ref().expect("checked: NO_CONN comes after the checks"));
                    codes[from + i] = code(sh.send_pending(*id, frame));
                }
                continue;
            }
            let mut inbox = sh.lock_inbox();
            if inbox.stop_deadline.is_some() {
                // With several loops, stop may begin between two runs: what
                // earlier runs queued stays queued (and may be written), so
                // the call is only STOPPED as a whole when nothing was.
                if !codes.contains(&0) {
                    return Err(Error::stopped());
                }
                codes.extend(run.iter().map(|_| Code::Stopped as i32));
                continue;
            }
            let before = codes.len();
            for (id, p) in run {
                let r = check(p)
                    .and_then(|()| sh.send_locked(&mut inbox, *id, Frame::One(p.as_ref().expect("checked"))));
                codes.push(code(r));
            }
            drop(inbox);
            if codes[before..].contains(&0) {
                sh.wake();
            }
        }
        Ok(codes)
    }

    /// Splits `items` into runs of consecutive items whose connections live
    /// on the same loop (one run with a single loop).
    fn runs<'a, T>(&self, items: &'a [T], id: impl Fn(&T) -> u64) -> Vec<&'a [T]> {
        let mut out = Vec::new();
        let mut start = 0;
        for i in 1..=items.len() {
            if i == items.len() || self.core.loop_of(id(&items[i])) != self.core.loop_of(id(&items[start])) {
                if start < i {
                    out.push(&items[start..i]);
                }
                start = i;
            }
        }
        out
    }

    pub fn close(&self, id: u64) -> Result<()> {
        self.check_live()?;
        let sh = self.route(id);
        match local_call(sh, id, |st| st.close(id)) {
            Some(r) => r,
            None => sh.close_from_host(id),
        }
    }

    /// tf_conn_abort: drop what is queued, reset, on_close(LOCAL).
    pub fn abort(&self, id: u64) -> Result<()> {
        self.check_live()?;
        let sh = self.route(id);
        match local_call(sh, id, |st| st.abort(id)) {
            Some(r) => r,
            None => sh.abort_from_host(id),
        }
    }

    /// Totals over every loop thread.
    pub fn stats(&self) -> Result<StatsSnapshot> {
        self.check_process()?;
        let mut total = StatsSnapshot::default();
        for sh in &self.loops {
            total.add(&sh.stats.snapshot());
        }
        Ok(total)
    }
}

/// What tf_conn_get_info reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    pub peer: String,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub frames_received: u64,
    pub frames_sent: u64,
    pub queued_output: u64,
    pub age_ms: u64,
    pub outbound: bool,
    pub paused: bool,
    pub thread: u32,
}

impl Server {
    /// The shared half of a connection the host may still name: without a
    /// lock inside a callback of this server, under the inbox lock elsewhere.
    fn with_conn<R>(&self, id: u64, f: impl FnOnce(&ConnShared) -> R) -> Result<R> {
        let mut f = Some(f);
        let sh = self.route(id);
        let local = event_loop::with_state(sh, |st| st.lookup(id).map(|c| (f.take().expect("once"))(c)));
        if let Some(Some(r)) = local {
            return Ok(r);
        }
        let inbox = sh.lock_inbox();
        match inbox.registry.get(&id) {
            Some(c) => Ok((f.take().expect("once"))(c)),
            None => Err(Error::no_conn(id)),
        }
    }

    /// tf_conn_set_user_data. Works during stop too (on_close may clear it).
    pub fn set_user_data(&self, id: u64, ptr: usize) -> Result<()> {
        self.check_process()?;
        self.with_conn(id, |c| c.user_data.store(ptr, Ordering::Release))
    }

    /// tf_conn_user_data: 0 when unset or unknown.
    pub fn user_data(&self, id: u64) -> usize {
        if self.check_process().is_err() {
            return 0;
        }
        self.with_conn(id, |c| c.user_data.load(Ordering::Acquire)).unwrap_or(0)
    }

    /// tf_conn_pause / tf_conn_resume.
    pub fn pause(&self, id: u64, pause: bool) -> Result<()> {
        self.check_live()?;
        let sh = self.route(id);
        if let Some(r) = local_call(sh, id, |st| if pause { st.pause(id) } else { st.resume(id) }) {
            return r;
        }
        sh.pause_from_host(id, pause)
    }

    /// tf_sendv, tf_send_many's single entries: any frame form.
    pub fn send_frame(&self, id: u64, frame: Frame<'_>) -> Result<()> {
        self.check_live()?;
        let sh = self.route(id);
        if frame.len() > sh.max_frame as usize {
            return Err(too_large(frame.len(), sh.max_frame));
        }
        match local_call(sh, id, |st| st.send_frame(id, frame)) {
            Some(r) => r,
            None => sh.send_pending(id, frame),
        }
    }

    /// tf_send_many: the same frame to each id (payloads from SHARE_FROM
    /// bytes are held once for all); returns how many took it.
    pub fn send_many(&self, ids: &[u64], payload: &[u8]) -> Result<usize> {
        self.check_live()?;
        let max_frame = self.first().max_frame;
        if payload.len() > max_frame as usize {
            return Err(too_large(payload.len(), max_frame));
        }
        if ids.is_empty() {
            return Ok(0);
        }
        let shared_payload;
        let frame = if payload.len() >= SHARE_FROM && ids.len() > 1 {
            let mut v = Vec::new();
            v.try_reserve_exact(payload.len()).map_err(|_| {
                Error::new(Code::Full, format!("no memory for a {} byte fan-out payload", payload.len()))
            })?;
            v.extend_from_slice(payload);
            shared_payload = std::sync::Arc::new(v);
            Frame::Shared(&shared_payload)
        } else {
            Frame::One(payload)
        };
        let mut total = 0;
        for run in self.runs(ids, |&id| id) {
            let sh = self.route(run[0]);
            let local = event_loop::with_state(sh, |st| {
                let mut unknown = Vec::new();
                let mut n = 0;
                for &id in run.iter() {
                    let r = st.send_frame(id, frame);
                    match st.unless_unknown(id, r) {
                        Some(Ok(())) => n += 1,
                        Some(Err(_)) => {}
                        None => unknown.push(id),
                    }
                }
                (n, unknown)
            });
            if let Some((n, unknown)) = local {
                // Not in the loop's table: perhaps connecting (local_call).
                total += n + unknown.into_iter().filter(|&id| sh.send_pending(id, frame).is_ok()).count();
                continue;
            }
            let mut inbox = sh.lock_inbox();
            if inbox.stop_deadline.is_some() {
                // As in send_batch: STOPPED only when nothing was queued;
                // otherwise the rest are skipped and `total` says so.
                if total == 0 {
                    return Err(Error::stopped());
                }
                continue;
            }
            let n = run.iter().filter(|&&id| sh.send_locked(&mut inbox, id, frame).is_ok()).count();
            drop(inbox);
            if n > 0 {
                sh.wake();
            }
            total += n;
        }
        Ok(total)
    }

    /// tf_connect: the new connection's id; it connects from the loop.
    pub fn connect(&self, addr: &str) -> Result<u64> {
        self.check_live()?;
        let addr = crate::addr::Address::parse_connect(addr)?;
        if !self.core.take_conn_slot() {
            return Err(Error::new(
                Code::Full,
                format!(
                    "max connections ({}) reached, counting connections being established",
                    self.core.max_connections
                ),
            ));
        }
        let id = self.core.next_id.fetch_add(1, Ordering::AcqRel);
        self.route(id).connect(id, addr).inspect_err(|_| self.core.give_conn_slot())?;
        Ok(id)
    }

    /// tf_server_drain: the listener stops listening during the call (its
    /// queue taken first); loop 0 serves what was taken and closes it. A
    /// host thread waits for that; a callback (of any server) does not.
    pub fn drain(&self) -> Result<()> {
        self.check_live()?;
        // Loop 0 owns the listener.
        let sh = self.first();
        sh.drain_requested.store(true, Ordering::Release);
        {
            // Held while the descriptor is used: loop 0 takes this lock to
            // forget the descriptor before it closes it.
            let mut early = sh.lock_early_drain();
            if let Some(fd) = early.listener {
                let taken = event_loop::stop_listening(fd);
                early.accepted.extend(taken);
            }
        }
        sh.wake();
        if event_loop::on_any_loop_thread() {
            // Inside a callback: waiting for loop 0 could be waiting for this
            // very thread, or for a loop that waits for it (a server freeing
            // or draining this one from its own callback).
            return Ok(());
        }
        let mut closed = sh.drained.lock().unwrap_or_else(|p| p.into_inner());
        while !*closed {
            closed = sh.drained_cv.wait(closed).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// tf_conn_get_info.
    pub fn conn_info(&self, id: u64) -> Result<ConnInfo> {
        self.check_process()?;
        self.with_conn(id, |c| ConnInfo {
            peer: c.peer.get().map(|p| p.to_string()).unwrap_or_default(),
            bytes_received: c.bytes_received.load(Ordering::Relaxed),
            bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
            frames_received: c.frames_received.load(Ordering::Relaxed),
            frames_sent: c.frames_sent.load(Ordering::Relaxed),
            queued_output: c.queued.load(Ordering::Relaxed),
            age_ms: c.born.elapsed().as_millis() as u64,
            outbound: c.outbound.load(Ordering::Relaxed),
            paused: c.paused.load(Ordering::Relaxed),
            thread: self.core.loop_of(id) as u32,
        })
    }
}

/// Fan-out payloads at least this long are held once and shared by every
/// queue they go to; shorter ones are cheaper to copy.
pub const SHARE_FROM: usize = 512;
