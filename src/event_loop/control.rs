//! Host control on the loop's state: pause and resume, per-connection user
//! data and info, gather and fan-out sends, the writable and slow-consumer
//! watches.

#![forbid(unsafe_code)]

use super::State;
use crate::conn::{encoded_len, CloseReason, ConnShared};
use crate::error::{Error, Result};
use crate::outq::Frame;
use crate::shared::{full_error, out_of_memory};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

impl State {
    /// The shared half of a connection the host may still name: open, or
    /// having its on_close reported right now. Without a lock.
    pub fn lookup(&self, id: u64) -> Option<&Arc<ConnShared>> {
        let slot = match self.current {
            (cur, slot) if cur == id => Some(slot),
            _ => self.ids.get(&id).copied(),
        };
        if let Some(c) = slot.and_then(|s| self.get(s)).filter(|c| c.id == id) {
            return Some(&c.shared);
        }
        self.reporting.iter().find(|(r, _)| *r == id).map(|(_, s)| s)
    }

    /// tf_sendv / tf_send_many on the loop thread.
    pub fn send_frame(&mut self, id: u64, payload: Frame<'_>) -> Result<()> {
        if let Frame::One(p) = payload {
            return self.send(id, p);
        }
        let slot = match self.current {
            (cur, slot) if cur == id => slot,
            _ => *self.ids.get(&id).ok_or_else(|| Error::no_conn(id))?,
        };
        let limit = self.max_queued_output;
        let fmt = self.format;
        let len = payload.len();
        let c = self.get_id(slot, id).ok_or_else(|| Error::no_conn(id))?;
        if !c.takes_frames() || c.shared.close_requested.load(Ordering::Acquire) {
            return Err(Error::no_conn(id));
        }
        let n = encoded_len(fmt, len);
        if c.shared.reserve(n, limit).is_err() {
            self.watch_writable(slot, id);
            return Err(full_error(id, len, limit));
        }
        let pool = &mut self.pool;
        let c = self.conns[slot as usize].as_mut().expect("looked up above");
        let queued = c.out.push(payload, &mut || pool.pop());
        if queued.is_err() {
            c.shared.release(n);
            return Err(out_of_memory(id, len));
        }
        self.mark_dirty(slot);
        self.note_queued(slot);
        Ok(())
    }

    /// tf_conn_pause on the loop thread (or a host thread's, applied).
    pub fn pause(&mut self, id: u64) -> Result<()> {
        let slot = self.live_slot(id)?;
        self.pause_slot(slot);
        Ok(())
    }

    /// tf_conn_resume on the loop thread (or a host thread's, applied).
    pub fn resume(&mut self, id: u64) -> Result<()> {
        let slot = self.live_slot(id)?;
        self.resume_slot(slot);
        Ok(())
    }

    /// The slot of a connection not yet reported closed.
    fn live_slot(&self, id: u64) -> Result<u32> {
        let slot = *self.ids.get(&id).ok_or_else(|| Error::no_conn(id))?;
        match self.get(slot) {
            Some(c) if c.id == id && c.shared.is_live() => Ok(slot),
            _ => Err(Error::no_conn(id)),
        }
    }

    pub(super) fn pause_slot(&mut self, slot: u32) {
        let Some(c) = self.get_mut(slot) else { return };
        c.shared.paused.store(true, Ordering::Release);
        if c.host_paused {
            return;
        }
        c.host_paused = true;
        // A paused connection is not idle: its clock stops until resume.
        self.idle_unlink(slot);
        self.resync.push(slot);
    }

    /// Schedules a delivery turn for `slot`'s held bytes (once: a flag, not
    /// a search of the list, so that many connections holding bytes cost
    /// one step each).
    pub(super) fn schedule_turn(&mut self, slot: u32) {
        let Some(c) = self.get_mut(slot) else { return };
        if !c.turn_due {
            c.turn_due = true;
            let id = c.id;
            self.resumed.push((slot, id));
        }
    }

    pub(super) fn resume_slot(&mut self, slot: u32) {
        let Some(c) = self.get_mut(slot) else { return };
        c.shared.paused.store(false, Ordering::Release);
        if !c.host_paused {
            return;
        }
        c.host_paused = false;
        self.idle_touch(slot, Instant::now());
        self.schedule_turn(slot);
        self.resync.push(slot);
    }

    /// A send to `slot` returned TF_ERR_FULL: tell the host once there is room.
    pub(super) fn watch_writable(&mut self, slot: u32, id: u64) {
        if !self.track_writable {
            return;
        }
        let Some(c) = self.get_id(slot, id) else { return };
        c.shared.want_writable.store(true, Ordering::Release);
        if !self.writable_watch.contains(&(slot, id)) {
            self.writable_watch.push((slot, id));
        }
    }

    /// The watched connections whose queued output fell to half the limit
    /// or less: their ids, each once (watch cleared for them).
    pub(super) fn take_writable(&mut self) -> Vec<u64> {
        if self.writable_watch.is_empty() {
            return Vec::new();
        }
        let half = self.max_queued_output / 2;
        let mut ready = Vec::new();
        let mut watch = std::mem::take(&mut self.writable_watch);
        watch.retain(|&(slot, id)| {
            let Some(c) = self.get(slot).filter(|c| c.id == id && c.close_reason().is_none()) else {
                return false; // closed first: no notification
            };
            if c.shared.queued.load(Ordering::Acquire) > half {
                return true;
            }
            if c.shared.want_writable.swap(false, Ordering::AcqRel) {
                ready.push(id);
            }
            false
        });
        self.writable_watch = watch;
        ready
    }

    /// Frames were queued for `slot`: start its slow-consumer clock when it
    /// went above the soft limit.
    pub(super) fn note_queued(&mut self, slot: u32) {
        let Some((soft, _)) = self.slow else { return };
        let Some(c) = self.get_mut(slot) else { return };
        if c.above_since.is_none() && c.shared.queued.load(Ordering::Acquire) > soft {
            c.above_since = Some(Instant::now());
            let id = c.id;
            self.slow_watch.push((slot, id));
        }
    }

    /// Closes (TF_CLOSE_SLOW) the connections that stayed above the soft
    /// limit for too long; forgets those that fell back below it. Returns
    /// the ids closed, and the next deadline.
    pub(super) fn check_slow(&mut self, now: Instant) -> (Vec<u64>, Option<Instant>) {
        let Some((soft, limit)) = self.slow else { return (Vec::new(), None) };
        let mut closed = Vec::new();
        let mut next: Option<Instant> = None;
        let mut watch = std::mem::take(&mut self.slow_watch);
        watch.retain(|&(slot, id)| {
            let Some(c) = self.get_id(slot, id) else { return false };
            let Some(since) = c.above_since else { return false };
            if c.shared.queued.load(Ordering::Acquire) <= soft {
                c.above_since = None;
                return false;
            }
            if c.close_reason().is_some() {
                return false;
            }
            if now >= since + limit {
                c.discard_output();
                c.eof = true;
                closed.push((slot, id));
                return false;
            }
            next = Some(next.map_or(since + limit, |n| n.min(since + limit)));
            true
        });
        self.slow_watch = watch;
        for &(slot, _) in &closed {
            self.mark_closing(slot, CloseReason::Slow);
        }
        (closed.into_iter().map(|(_, id)| id).collect(), next)
    }

    /// The earliest slow-consumer deadline (for the poll timeout).
    pub(super) fn next_slow_deadline(&self) -> Option<Instant> {
        let (_, limit) = self.slow?;
        self.slow_watch
            .iter()
            .filter_map(|&(slot, id)| self.get(slot).filter(|c| c.id == id)?.above_since)
            .min()
            .map(|s| s + limit)
    }
}
