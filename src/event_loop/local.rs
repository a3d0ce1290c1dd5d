//! The thread-local link from a loop thread to its `State`, so that
//! tf_send / tf_conn_close from inside a callback need no lock.

#![forbid(unsafe_code)]

use super::State;
use crate::shared::Shared;
use std::cell::RefCell;
use std::rc::Rc;

/// Links this thread to the loop it runs, for tf_send from callbacks.
pub(super) struct Link {
    pub(super) shared: *const Shared,
    /// The server (its `Core`), whichever of its loops this is.
    pub(super) server: *const crate::shared::Core,
    /// The process the loop thread ran in: a child forked from inside a
    /// callback inherits this thread-local but is on no loop thread.
    pub(super) epoch: u64,
    pub(super) state: Rc<RefCell<State>>,
}

thread_local! {
    pub(super) static CURRENT: RefCell<Option<Link>> = const { RefCell::new(None) };
}

// Thread-locals are reached with try_with: from a thread-exit destructor
// they may already be gone, and then this is simply not a loop thread.

/// Runs `f` on this server's loop state when called from inside one of its
/// callbacks (no lock, no system call); None on any other thread.
#[inline]
pub fn with_state<R>(shared: &Shared, f: impl FnOnce(&mut State) -> R) -> Option<R> {
    with_local(shared, f)
}

#[inline]
fn with_local<R>(shared: &Shared, f: impl FnOnce(&mut State) -> R) -> Option<R> {
    CURRENT
        .try_with(|cur| {
            let cur = cur.try_borrow().ok()?;
            let link = cur.as_ref().filter(|l| std::ptr::eq(l.shared, shared))?;
            // Busy only when the loop itself calls out while holding the state
            // (the log callback): then the host path, with its lock, is used.
            let mut state = link.state.try_borrow_mut().ok()?;
            Some(f(&mut state))
        })
        .ok()
        .flatten()
}

/// The loop this thread runs (its `Shared` and its server's `Core`, as
/// addresses), if any: then we are inside one of its callbacks.
fn current() -> Option<(usize, usize)> {
    let (shared, server, epoch) = CURRENT
        .try_with(|cur| {
            cur.try_borrow().ok()?.as_ref().map(|l| (l.shared as usize, l.server as usize, l.epoch))
        })
        .ok()
        .flatten()?;
    (epoch == crate::sys::process_epoch()).then_some((shared, server))
}

/// The server (its `Core`, as an address) whose loop thread this is, if
/// any: then we are inside one of its callbacks.
pub fn current_loop() -> Option<usize> {
    current().map(|(_, server)| server)
}

/// The loop (its `Shared`, as an address) this thread runs, if any.
pub fn current_loop_shared() -> Option<usize> {
    current().map(|(shared, _)| shared)
}

/// True on the loop thread of any server: inside some tcpframe callback.
pub fn on_any_loop_thread() -> bool {
    current_loop().is_some()
}
