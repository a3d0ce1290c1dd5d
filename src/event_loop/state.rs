//! `State`: the loop's connection slab, id map, dirty and closing lists,
//! buffer pool and idle order, plus tf_send / tf_conn_close / host commands.

#![forbid(unsafe_code)]

use crate::conn::{encoded_len, CloseReason, Conn, NIL};
use crate::error::{Error, Result};
use crate::server::{full_error, IdMap, CMD_CLOSE, CMD_SEND};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// The loop's connection table and write side. Borrowed only between
/// callbacks, by the loop itself or by tf_send/tf_conn_close on its thread.
pub struct State {
    conns: Vec<Option<Conn>>,
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
    max_queued_output: u64,
    /// The connection whose frames are being dispatched (id 0: none), so
    /// that the common reply to the sender skips the id lookup.
    pub(super) current: (u64, u32),
}

impl State {
    pub(super) fn new(track_idle: bool, max_queued_output: u64) -> State {
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
            current: (0, NIL),
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
        let Some(c) = self.get_mut(slot) else { return };
        c.mark_closing(reason);
        if !c.in_closing_list {
            c.in_closing_list = true;
            self.closing.push(slot);
        }
    }

    fn queue_frame(&mut self, slot: u32, payload: &[u8]) {
        let pool = &mut self.pool;
        if let Some(c) = self.conns.get_mut(slot as usize).and_then(|c| c.as_mut()) {
            c.push_frame(payload, || pool.pop().unwrap_or_default());
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(slot);
            }
        }
    }

    /// tf_send on the loop thread: checked and queued synchronously.
    pub(super) fn send(&mut self, id: u64, payload: &[u8]) -> Result<()> {
        let slot = match self.current {
            (cur, slot) if cur == id => slot,
            _ => *self.ids.get(&id).ok_or_else(|| Error::no_conn(id))?,
        };
        let limit = self.max_queued_output;
        let c = self.get_id(slot, id).ok_or_else(|| Error::no_conn(id))?;
        if !c.takes_frames() || c.shared.close_requested.load(Ordering::Acquire) {
            return Err(Error::no_conn(id));
        }
        c.shared
            .reserve(encoded_len(payload.len()), limit)
            .map_err(|_| full_error(id, payload.len(), limit))?;
        self.queue_frame(slot, payload);
        Ok(())
    }

    /// tf_conn_close on the loop thread.
    pub(super) fn close(&mut self, id: u64) -> Result<()> {
        let slot = *self.ids.get(&id).ok_or_else(|| Error::no_conn(id))?;
        let c = self.get_mut(slot).ok_or_else(|| Error::no_conn(id))?;
        if c.shared.close_requested.swap(true, Ordering::AcqRel) {
            return Err(Error::no_conn(id));
        }
        self.mark_closing(slot, CloseReason::Local);
        Ok(())
    }

    /// Applies one host command; the host already checked and reserved.
    pub(super) fn apply(&mut self, kind: u8, id: u64, payload: &[u8]) {
        let Some(&slot) = self.ids.get(&id) else { return };
        let Some(c) = self.get_mut(slot) else { return };
        match kind {
            CMD_SEND if c.is_flushing() => {
                // Accepted before tf_conn_close or stop: still written.
                self.queue_frame(slot, payload)
            }
            CMD_SEND => c.shared.release(encoded_len(payload.len())),
            CMD_CLOSE => self.mark_closing(slot, CloseReason::Local),
            _ => {}
        }
    }
}
