//! The thread-local link from a loop thread to its `State`, so that
//! tf_send / tf_conn_close from inside a callback need no lock.

#![forbid(unsafe_code)]

use super::State;
use crate::error::Result;
use crate::server::Shared;
use std::cell::RefCell;
use std::rc::Rc;

/// Links this thread to the loop it runs, for tf_send from callbacks.
pub(super) struct Link {
    pub(super) shared: *const Shared,
    pub(super) state: Rc<RefCell<State>>,
}

thread_local! {
    pub(super) static CURRENT: RefCell<Option<Link>> = const { RefCell::new(None) };
}

fn with_local<R>(shared: &Shared, f: impl FnOnce(&mut State) -> R) -> Option<R> {
    CURRENT.with(|cur| {
        let cur = cur.borrow();
        let link = cur.as_ref().filter(|l| std::ptr::eq(l.shared, shared))?;
        // Busy only when the loop itself calls out while holding the state
        // (the log callback): then the host path, with its lock, is used.
        let mut state = link.state.try_borrow_mut().ok()?;
        Some(f(&mut state))
    })
}

/// True on the loop thread of any server: inside some tcpframe callback.
pub fn on_any_loop_thread() -> bool {
    CURRENT.with(|cur| cur.borrow().is_some())
}

/// tf_send from inside a callback of this server; None on any other thread.
pub fn local_send(shared: &Shared, id: u64, payload: &[u8]) -> Option<Result<()>> {
    with_local(shared, |st| st.send(id, payload))
}

/// tf_conn_close from inside a callback of this server; None elsewhere.
pub fn local_close(shared: &Shared, id: u64) -> Option<Result<()>> {
    with_local(shared, |st| st.close(id))
}
