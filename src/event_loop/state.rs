//! `State`: the loop's connection slab, id map, dirty and closing lists,
//! buffer pool, idle order, close deadlines and partial-frame budget, plus
//! tf_send / tf_conn_close / tf_conn_abort / host commands.

#![forbid(unsafe_code)]

use crate::conn::{encoded_len, CloseReason, Conn, ConnShared, Phase, NIL};
use crate::error::{Error, Result};
use crate::frame::Format;
use crate::outq::{OutOfMemory, OutQueue};
use crate::shared::{
    abortable, full_error, out_of_memory, IdMap, CMD_ABORT, CMD_CLOSE, CMD_PAUSE, CMD_RESUME, CMD_SEND,
    CMD_WATCH,
};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Output chunks kept for reuse by the whole loop (at most 1 MiB in all).
const POOL_MAX: usize = (1 << 20) / crate::outq::CHUNK;

/// The loop's connection table and write side. Borrowed only between
/// callbacks, by the loop itself or by tf_send/tf_conn_close on its thread.
pub struct State {
    pub(super) conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    pub(super) ids: IdMap<u32>,
    /// Slots with frames queued this iteration.
    pub(super) dirty: Vec<u32>,
    /// Slots marked for closing.
    pub(super) closing: Vec<u32>,
    /// Empty output buffers for reuse: no allocation per frame when busy,
    /// no buffer held by an idle connection.
    pub(super) pool: Vec<Vec<u8>>,
    pub(super) idle_head: u32,
    idle_tail: u32,
    track_idle: bool,
    pub(super) max_queued_output: u64,
    pub(super) format: Format,
    /// The connection whose frames are being dispatched (id 0: none), so
    /// that the common reply to the sender skips the id lookup.
    pub(super) current: (u64, u32),
    /// Graceful closes waiting for their output, by deadline (one timeout
    /// for all, so arrival order is deadline order): (deadline, slot, id).
    pub(super) lingering: VecDeque<(Instant, u32, u64)>,
    close_timeout: Duration,
    /// Partial-frame bytes held by all connections (the max_buffered budget).
    pub(super) buffered: u64,
    /// Connections the host resumed this iteration: (slot, id).
    pub(super) resumed: Vec<(u32, u64)>,
    /// Connections whose poller interest changed inside a callback.
    pub(super) resync: Vec<u32>,
    /// Connections whose on_close is being reported: still readable.
    pub(super) reporting: Vec<(u64, Arc<ConnShared>)>,
    /// on_writable / TF_EVENT_WRITABLE wanted by the host.
    pub(super) track_writable: bool,
    /// Connections that got TF_ERR_FULL and wait for room: (slot, id).
    pub(super) writable_watch: Vec<(u32, u64)>,
    /// Slow-consumer policy: soft limit and how long above it is too long.
    pub(super) slow: Option<(u64, Duration)>,
    /// Connections above the soft limit: (slot, id).
    pub(super) slow_watch: Vec<(u32, u64)>,
    /// Outbound connects in progress, by deadline (one timeout for all):
    /// (deadline, slot, id).
    pub(super) connect_deadlines: VecDeque<(Instant, u32, u64)>,
    /// Accepted connections whose PROXY header is due (one timeout for
    /// all): (deadline, slot, id).
    pub(super) proxy_deadlines: VecDeque<(Instant, u32, u64)>,
}

/// The limits State enforces, from the configuration.
pub struct StateConfig {
    pub track_idle: bool,
    pub max_queued_output: u64,
    pub format: Format,
    pub close_timeout: Duration,
    pub track_writable: bool,
    pub slow: Option<(u64, Duration)>,
}

impl State {
    pub(super) fn new(cfg: StateConfig) -> State {
        let StateConfig { track_idle, max_queued_output, format, close_timeout, track_writable, slow } = cfg;
        State {
            conns: Vec::new(),
            free: Vec::new(),
            ids: IdMap::default(),
            dirty: Vec::new(),
            closing: Vec::new(),
            pool: Vec::new(),
            idle_head: NIL,
            idle_tail: NIL,
            track_idle,
            max_queued_output,
            format,
            current: (0, NIL),
            lingering: VecDeque::new(),
            close_timeout,
            buffered: 0,
            resumed: Vec::new(),
            resync: Vec::new(),
            reporting: Vec::new(),
            track_writable,
            writable_watch: Vec::new(),
            slow,
            slow_watch: Vec::new(),
            connect_deadlines: VecDeque::new(),
            proxy_deadlines: VecDeque::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    pub(super) fn get(&self, slot: u32) -> Option<&Conn> {
        self.conns.get(slot as usize).and_then(|c| c.as_ref())
    }

    pub(super) fn get_mut(&mut self, slot: u32) -> Option<&mut Conn> {
        self.conns.get_mut(slot as usize).and_then(|c| c.as_mut())
    }

    /// The connection in `slot`, if it is still the one named `id`.
    pub(super) fn get_id(&mut self, slot: u32, id: u64) -> Option<&mut Conn> {
        self.get_mut(slot).filter(|c| c.id == id)
    }

    pub(super) fn insert(&mut self, conn: Conn) -> u32 {
        let id = conn.id;
        let slot = match self.free.pop() {
            Some(s) => {
                self.conns[s as usize] = Some(conn);
                s
            }
            None => {
                self.conns.push(Some(conn));
                (self.conns.len() - 1) as u32
            }
        };
        self.ids.insert(id, slot);
        if self.track_idle {
            self.idle_push_back(slot);
        }
        slot
    }

    pub(super) fn remove(&mut self, slot: u32) -> Option<Conn> {
        self.idle_unlink(slot);
        let conn = self.conns.get_mut(slot as usize)?.take()?;
        self.ids.remove(&conn.id);
        self.buffered -= conn.buffered as u64;
        self.free.push(slot);
        Some(conn)
    }

    pub(super) fn conn_mut(&mut self, slot: u32) -> &mut Conn {
        self.conns[slot as usize].as_mut().expect("linked slot holds a connection")
    }

    fn idle_push_back(&mut self, slot: u32) {
        let tail = self.idle_tail;
        {
            let c = self.conn_mut(slot);
            c.idle_prev = tail;
            c.idle_next = NIL;
        }
        if tail == NIL {
            self.idle_head = slot;
        } else {
            self.conn_mut(tail).idle_next = slot;
        }
        self.idle_tail = slot;
    }

    pub(super) fn idle_unlink(&mut self, slot: u32) {
        let head = self.idle_head;
        let Some(c) = self.get_mut(slot) else { return };
        let (prev, next) = (c.idle_prev, c.idle_next);
        if prev == NIL && next == NIL && head != slot {
            return; // not linked
        }
        c.idle_prev = NIL;
        c.idle_next = NIL;
        if prev == NIL {
            self.idle_head = next;
        } else {
            self.conn_mut(prev).idle_next = next;
        }
        if next == NIL {
            self.idle_tail = prev;
        } else {
            self.conn_mut(next).idle_prev = prev;
        }
    }

    /// A complete frame arrived: the connection moves to the back of the
    /// idle order, which therefore stays sorted by last activity.
    pub(super) fn idle_touch(&mut self, slot: u32, now: Instant) {
        if let Some(c) = self.get_mut(slot) {
            c.last_frame = now;
        }
        if self.track_idle && self.idle_tail != slot {
            self.idle_unlink(slot);
            self.idle_push_back(slot);
        }
    }

    pub(super) fn mark_dirty(&mut self, slot: u32) {
        if let Some(c) = self.get_mut(slot) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(slot);
            }
        }
    }

    pub(super) fn mark_closing(&mut self, slot: u32, reason: CloseReason) {
        let close_timeout = self.close_timeout;
        let Some(c) = self.get_mut(slot) else { return };
        let first = c.mark_closing(reason);
        let id = c.id;
        let waits = matches!(c.phase, Phase::Closing { flush: true, .. });
        if !c.in_closing_list {
            c.in_closing_list = true;
            self.closing.push(slot);
        }
        if first && waits {
            // A peer that never reads must not hold the connection forever.
            self.lingering.push_back((Instant::now() + close_timeout, slot, id));
        }
    }

    /// Drops the connection's output and resets it (tf_conn_abort, or a
    /// close whose output could not be written in time).
    pub(super) fn abort_slot(&mut self, slot: u32) {
        let Some(c) = self.get_mut(slot) else { return };
        c.abort();
        if !c.in_closing_list {
            c.in_closing_list = true;
            self.closing.push(slot);
        }
    }

    /// Resets the graceful closes whose deadline passed with output still
    /// queued; returns their ids (for the log).
    pub(super) fn expire_lingering(&mut self, now: Instant) -> Vec<u64> {
        let mut expired = Vec::new();
        while let Some(&(deadline, slot, id)) = self.lingering.front() {
            if deadline > now {
                break;
            }
            self.lingering.pop_front();
            let waiting = self
                .get_id(slot, id)
                .is_some_and(|c| matches!(c.phase, Phase::Closing { flush: true, .. }) && c.has_output());
            if waiting {
                self.abort_slot(slot);
                expired.push(id);
            }
        }
        expired
    }

    /// The next close deadline, if any.
    pub(super) fn next_linger_deadline(&self) -> Option<Instant> {
        self.lingering.front().map(|&(d, _, _)| d)
    }

    /// Brings the budget up to date with what `slot`'s decoder now holds.
    pub(super) fn account_buffered(&mut self, slot: u32) {
        let Some(c) = self.get_mut(slot) else { return };
        // The contract's budget is in bytes held (received, not delivered),
        // not in what their buffers reserve: a buffer reserves at most
        // GROW_SLACK (64 KiB) more than what arrived, so memory stays within
        // the budget plus that much per connection holding a partial frame.
        let now_held = c.decoder.held_len() + c.stash.len();
        let before = std::mem::replace(&mut c.buffered, now_held);
        self.buffered = self.buffered - before as u64 + now_held as u64;
    }

    /// The connection holding the most partial-frame bytes.
    pub(super) fn largest_holder(&self) -> Option<u32> {
        self.ids
            .values()
            .copied()
            .filter(|&s| self.get(s).is_some_and(|c| c.buffered > 0))
            .max_by_key(|&s| self.get(s).map_or(0, |c| c.buffered))
    }

    /// Gives the partial frame of a closing connection back to the budget.
    pub(super) fn drop_partial(&mut self, slot: u32) {
        if let Some(c) = self.get_mut(slot) {
            c.decoder.clear();
            c.stash = Vec::new();
        }
        self.account_buffered(slot);
    }

    pub(super) fn queue_frame(&mut self, slot: u32, payload: &[u8]) -> std::result::Result<(), OutOfMemory> {
        let pool = &mut self.pool;
        if let Some(c) = self.conns.get_mut(slot as usize).and_then(|c| c.as_mut()) {
            c.push_frame(payload, &mut || pool.pop())?;
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(slot);
            }
        }
        Ok(())
    }

    /// Records that `n` bytes of `slot`'s output were written; returns the
    /// frames completed. Written chunks go back to the pool.
    pub(super) fn wrote(&mut self, slot: u32, n: usize) -> u64 {
        let pool = &mut self.pool;
        match self.conns.get_mut(slot as usize).and_then(|c| c.as_mut()) {
            Some(c) => c.wrote(n, &mut |chunk| State::recycle(pool, chunk)),
            None => 0,
        }
    }

    /// A written output chunk, kept for reuse while the pool has room.
    pub(super) fn recycle(pool: &mut Vec<Vec<u8>>, mut chunk: Vec<u8>) {
        if pool.len() < POOL_MAX && chunk.capacity() <= crate::outq::CHUNK {
            chunk.clear();
            pool.push(chunk);
        }
    }

    /// tf_send on the loop thread: checked and queued synchronously.
    /// `r`, unless it is NO_CONN for an id this table does not hold at all
    /// (a tf_connect made from this very callback waits in the inbox until
    /// the loop's next pass): None, so that the caller asks the inbox. Only
    /// looked up on that error, never on the hot path.
    pub fn unless_unknown<T>(&self, id: u64, r: Result<T>) -> Option<Result<T>> {
        match r {
            Err(e) if e.code == crate::error::Code::NoConn && !self.ids.contains_key(&id) => None,
            r => Some(r),
        }
    }

    pub fn send(&mut self, id: u64, payload: &[u8]) -> Result<()> {
        let slot = match self.current {
            (cur, slot) if cur == id => slot,
            _ => *self.ids.get(&id).ok_or_else(|| Error::no_conn(id))?,
        };
        let limit = self.max_queued_output;
        let fmt = self.format;
        let c = self.get_id(slot, id).ok_or_else(|| Error::no_conn(id))?;
        if !c.takes_frames() || c.shared.close_requested.load(Ordering::Acquire) {
            return Err(Error::no_conn(id));
        }
        let n = encoded_len(fmt, payload.len());
        if c.shared.reserve(n, limit).is_err() {
            self.watch_writable(slot, id);
            return Err(full_error(id, payload.len(), limit));
        }
        if self.queue_frame(slot, payload).is_err() {
            if let Some(c) = self.get_mut(slot) {
                c.shared.release(n);
            }
            return Err(out_of_memory(id, payload.len()));
        }
        self.note_queued(slot);
        Ok(())
    }

    /// tf_conn_close on the loop thread: only for a connection that is not
    /// closing already (for whatever reason).
    pub fn close(&mut self, id: u64) -> Result<()> {
        let slot = *self.ids.get(&id).ok_or_else(|| Error::no_conn(id))?;
        let c = self.get_mut(slot).ok_or_else(|| Error::no_conn(id))?;
        if c.phase != Phase::Open || c.shared.close_requested.swap(true, Ordering::AcqRel) {
            return Err(Error::no_conn(id));
        }
        self.mark_closing(slot, CloseReason::Local);
        Ok(())
    }

    /// tf_conn_abort on the loop thread.
    pub fn abort(&mut self, id: u64) -> Result<()> {
        let slot = *self.ids.get(&id).ok_or_else(|| Error::no_conn(id))?;
        let c = self.get_mut(slot).ok_or_else(|| Error::no_conn(id))?;
        if !abortable(&c.shared) {
            return Err(Error::no_conn(id));
        }
        c.shared.close_requested.store(true, Ordering::Release);
        self.abort_slot(slot);
        Ok(())
    }

    /// Applies one host command; the host already checked and reserved.
    /// SEND comes with the frames host threads queued for the connection.
    pub(super) fn apply(&mut self, kind: u8, id: u64, frames: Option<OutQueue>) {
        let slot = self.ids.get(&id).copied();
        let Some(c) = slot.and_then(|s| self.get_id(s, id)) else {
            if let Some(q) = frames {
                // Gone already: nothing holds the reservation any more.
                drop(q);
            }
            return;
        };
        let slot = slot.expect("found above");
        match (kind, frames) {
            (CMD_SEND, Some(q)) if c.is_flushing() => {
                // Accepted before tf_conn_close or stop: still written.
                let pool = &mut self.pool;
                let c = self.conns[slot as usize].as_mut().expect("looked up above");
                if let Err(lost) = c.out.append(q, &mut || pool.pop()) {
                    c.shared.release(lost as u64);
                    c.discard_output();
                    c.eof = true;
                    self.mark_closing(slot, CloseReason::Overload);
                } else {
                    self.mark_dirty(slot);
                    self.note_queued(slot);
                }
            }
            (CMD_SEND, Some(q)) => c.shared.release(q.unsent() as u64),
            (CMD_CLOSE, _) => self.mark_closing(slot, CloseReason::Local),
            (CMD_ABORT, _) => self.abort_slot(slot),
            (CMD_PAUSE, _) => self.pause_slot(slot),
            (CMD_RESUME, _) => self.resume_slot(slot),
            (CMD_WATCH, _) => self.watch_writable(slot, id),
            _ => {}
        }
    }
}
