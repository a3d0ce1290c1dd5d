//! `Starter`: what the loop needs, gathered on the host thread; `run`
//! builds the `EventLoop` on the loop thread and runs it.

#![forbid(unsafe_code)]

use super::local::{Link, CURRENT};
use super::log::{Logger, Topic};
use super::{EventLoop, Handler, State, StateConfig, SCRATCH};
use crate::config::{Config, LogLevel, LogSink};
use crate::frame::Format;
use crate::server::Listening;
use crate::shared::Shared;
use crate::sys::{Backend, Poller};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl<H: Handler> Starter<H> {
    /// Gathers what the loop needs on the host thread; the loop's own state
    /// (which holds an `Rc`) is created on the loop thread, in `run`.
    pub fn new(
        config: &Config,
        shared: Arc<Shared>,
        poller: Poller,
        listening: Listening,
        backend: Backend,
        handler: H,
        peers: Vec<Arc<Shared>>,
    ) -> Starter<H> {
        Starter {
            peers,
            shared,
            poller,
            listening,
            backend,
            handler,
            connect_timeout: Duration::from_millis(config.connect_timeout_ms as u64),
            proxy: config.proxy,
            max_per_ip: config.max_connections_per_ip,
            max_frame: config.effective_max_frame(),
            format: config.prefix,
            max_queued_output: config.max_queued_output,
            max_buffered: config.max_buffered,
            writable_events: config.writable_events,
            slow_consumer: config.slow_consumer,
            close_timeout: Duration::from_millis(config.close_timeout_ms as u64),
            idle_timeout: (config.idle_timeout_ms > 0)
                .then(|| Duration::from_millis(config.idle_timeout_ms as u64)),
            log: config.log.clone(),
        }
    }
}

/// Everything the loop needs, in a form that may move to the new thread.
pub struct Starter<H: Handler> {
    peers: Vec<Arc<Shared>>,
    shared: Arc<Shared>,
    poller: Poller,
    listening: Listening,
    backend: Backend,
    handler: H,
    connect_timeout: Duration,
    proxy: Option<crate::proxy::Mode>,
    max_per_ip: u32,
    max_frame: u32,
    format: Format,
    max_queued_output: u64,
    max_buffered: u64,
    writable_events: bool,
    slow_consumer: Option<(u64, u32)>,
    close_timeout: Duration,
    idle_timeout: Option<Duration>,
    log: Option<LogSink>,
}

impl<H: Handler> Starter<H> {
    /// Runs the loop on the current thread until the server stops.
    pub fn run(self) {
        if !self.listening.inherited {
            self.shared.lock_early_drain().listener = self.listening.fd.as_ref().map(crate::sys::raw);
        }
        let state = Rc::new(RefCell::new(State::new(StateConfig {
            track_idle: self.idle_timeout.is_some(),
            max_queued_output: self.max_queued_output,
            format: self.format,
            close_timeout: self.close_timeout,
            track_writable: self.writable_events,
            slow: self.slow_consumer.map(|(soft, secs)| (soft, Duration::from_secs(secs as u64))),
        })));
        let mut lp = EventLoop {
            shared: self.shared.clone(),
            state: state.clone(),
            poller: self.poller,
            listener: self.listening.fd,
            socket_file: self.listening.file,
            set_nodelay: self.listening.inherited,
            address: self.listening.text,
            backend: self.backend,
            handler: self.handler,
            scratch: vec![0u8; SCRATCH],
            events: Vec::with_capacity(256),
            cmds: Vec::new(),
            connects: Default::default(),
            connect_timeout: self.connect_timeout,
            proxy: self.proxy,
            max_per_ip: (self.max_per_ip > 0).then_some(self.max_per_ip),
            peers: self.peers,
            adopted: Default::default(),
            drained: false,
            pending: Default::default(),
            max_frame: self.max_frame,
            format: self.format,
            max_buffered: self.max_buffered,
            budget_counted: 0,
            idle_timeout: self.idle_timeout,
            spare_fd: super::accept::open_spare(),
            accept_paused_until: None,
            shutdown_deadline: None,
            paused: Vec::new(),
            accept_blocked: false,
            last_busy: Instant::now(),
            trimmed: true,
            log: Logger { sink: self.log, shared: self.shared.clone(), buckets: Default::default() },
        };
        CURRENT.with(|c| {
            *c.borrow_mut() = Some(Link {
                shared: Arc::as_ptr(&lp.shared),
                server: Arc::as_ptr(&lp.shared.core),
                epoch: lp.shared.epoch,
                state,
            });
        });
        let backend = lp.backend;
        let address = lp.address.clone();
        lp.log.log(Topic::Lifecycle, LogLevel::Info, || {
            format!("tcpframe: listening on {address} ({backend:?} backend)")
        });
        if lp.spare_fd.is_none() {
            lp.log.log(Topic::Accept, LogLevel::Warn, || {
                "tcpframe: no spare file descriptor could be opened (RLIMIT_NOFILE too low?): \
                 while descriptors run out, new connections wait in the backlog until one frees"
                    .into()
            });
        }
        lp.run();
        let _ = CURRENT.try_with(|c| c.borrow_mut().take());
        let shared = lp.shared.clone();
        drop(lp); // the handler too: a pull queue learns that nothing more comes
        shared.loop_ended();
    }
}
