//! What the engine works with: instances and their factories, whose
//! fault a failed start is, how an engine is sized, its counts and
//! events, and where its tasks live.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitStatus;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A future that completes when an instance's process has exited.
pub type ExitEvent = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What the engine needs of an instance.
pub trait Instance: Send + 'static {
    /// Where the instance serves, as the layer above needs it (for a VM:
    /// its [`crate::vmm::Endpoint`]).
    type Address: Clone + Send + Sync + 'static;
    /// Its id, for logs.
    fn name(&self) -> String;
    /// Its address.
    fn address(&self) -> Self::Address;
    /// Whether its process has exited, and how: a non-blocking check.
    fn has_exited(&mut self) -> Option<ExitStatus>;
    /// Whether its process is exiting or has exited: the check made at
    /// every lease. By default [`Instance::has_exited`].
    fn is_exiting(&mut self) -> bool {
        self.has_exited().is_some()
    }
    /// Completes when its process exits (for a VM, the VMM process's
    /// pidfd becomes readable): the engine's one waiter per instance.
    fn exited(&self) -> ExitEvent;
}

/// Whose fault a failed start was: it decides what a client is told
/// and how operators read the error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// The app itself: its code did not load, it crashed or never
    /// answered.
    App,
    /// The host, the VMM or the guest below the app.
    Host,
}

/// An error a [`Factory`] start can fail with.
pub trait StartError: std::error::Error + Send + Sync + 'static {
    /// Whose fault it is.
    fn blame(&self) -> Blame {
        Blame::Host
    }
}

/// Why a start failed, as the engine records it.
#[derive(Debug, thiserror::Error)]
pub enum StartFailure {
    /// The factory returned an error.
    #[error("{error}")]
    Failed {
        /// The factory's error.
        #[source]
        error: Box<dyn std::error::Error + Send + Sync>,
        /// Whose fault it was.
        blame: Blame,
    },
    /// The start did not finish within `start_timeout`.
    #[error("the start did not finish within {0:?} (start_timeout)")]
    TimedOut(Duration),
    /// The start panicked; the message is the panic's.
    #[error("the start panicked: {0}")]
    Panicked(String),
}

impl StartFailure {
    /// Its `reason` label of `snapgate_restore_failures_total`: `app`
    /// (the app's fault), `host` (the host's, the VMM's or the guest's
    /// below the app), `timeout` (`start_timeout` passed) or `panic`.
    pub fn reason(&self) -> &'static str {
        match self {
            StartFailure::Failed {
                blame: Blame::App, ..
            } => "app",
            StartFailure::Failed { .. } => "host",
            StartFailure::TimedOut(_) => "timeout",
            StartFailure::Panicked(_) => "panic",
        }
    }

    /// Whose fault it is.
    pub fn blame(&self) -> Blame {
        match self {
            StartFailure::Failed { blame, .. } => *blame,
            _ => Blame::Host,
        }
    }
}

/// Starts and stops instances of one kind.
#[async_trait]
pub trait Factory: Send + Sync + 'static {
    /// What it starts.
    type Instance: Instance;
    /// How a start fails.
    type Error: StartError;
    /// Starts one instance named `id` and returns it once it can serve.
    /// Must be cancel-safe: a dropped start leaves nothing running.
    async fn start(&self, id: crate::vmm::VmId) -> Result<Self::Instance, Self::Error>;
    /// Stops an instance and waits until it is gone.
    async fn stop(&self, instance: Self::Instance) -> Result<(), Self::Error>;
}

/// Events and counts of an engine, for its owner's metrics.
pub trait Observer: Send + Sync + 'static {
    /// The counts changed.
    fn publish(&self, stats: &Stats);
    /// An instance started in `took`.
    fn restored(&self, took: Duration);
    /// A start failed, after `took`.
    fn restore_failed(&self, failure: &StartFailure, took: Duration);
    /// A member left and is being stopped, `why`, after serving
    /// `lived` since it joined.
    fn stopped(&self, why: StopReason, lived: Duration);
    /// An instance's process died or it broke a request.
    fn instance_failed(&self);
    /// An operator drained an instance ([`super::Engine::drain`]).
    fn drained(&self) {}
}

/// Why a member left its engine and was stopped: the `reason` label of
/// `snapgate_reaped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Idle for `idle_timeout` with more members than `min_warm`.
    Idle,
    /// An operator drained it ([`super::Engine::drain`]).
    Drained,
    /// Its process died, or it broke a request.
    Failed,
    /// Its engine closed: its app left the config, or the gateway shut
    /// down.
    Closed,
    /// Started after its claimer gave up, beyond `min_warm`, in a set that
    /// never reaps (a runtime's stock).
    Surplus,
}

impl StopReason {
    /// Its label value.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Idle => "idle",
            StopReason::Drained => "drained",
            StopReason::Failed => "failed",
            StopReason::Closed => "closed",
            StopReason::Surplus => "surplus",
        }
    }

    /// Every reason, for series created at zero.
    pub const ALL: [StopReason; 5] = [
        StopReason::Idle,
        StopReason::Drained,
        StopReason::Failed,
        StopReason::Closed,
        StopReason::Surplus,
    ];
}

/// How many instances an engine keeps and how it hands them out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizing {
    /// Members kept started and idle.
    pub min_warm: usize,
    /// Most members plus restores at once.
    pub max_instances: usize,
    /// Most leases one member holds at once.
    pub max_concurrency: usize,
    /// An idle member is reaped after this long (down to `min_warm`);
    /// `None` never reaps.
    pub idle_timeout: Option<Duration>,
    /// Longest one start may take.
    pub start_timeout: Duration,
    /// Most claims waiting at once.
    pub hold_queue: usize,
    /// Longest a claim waits.
    pub hold_timeout: Duration,
}

/// Counts of an engine, published on every change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Members: ready, serving or draining.
    pub instances: usize,
    /// Members serving at least one lease.
    pub leased: usize,
    /// Members that would take one more lease now: not draining, with
    /// fewer than `max_concurrency` in flight (free ones included).
    pub open: usize,
    /// Members draining (dead, broken or closing).
    pub draining: usize,
    /// Restores in flight.
    pub restoring: usize,
    /// Claims waiting in the hold queue.
    pub queued: usize,
    /// Stops in flight.
    pub stopping: usize,
    /// The most members plus restores there ever were at once.
    pub peak: usize,
    /// Whether the engine was closed.
    pub closed: bool,
}

impl Stats {
    /// Members free to lease: neither leased nor draining.
    pub fn warm(&self) -> usize {
        self.instances - self.leased - self.draining
    }

    /// Nothing left: no member, restore or stop.
    pub fn is_empty(&self) -> bool {
        self.instances == 0 && self.restoring == 0 && self.stopping == 0
    }
}

/// Where an engine's tasks live: the gateway's tracker and cancel token
/// (each engine makes a child token of it).
#[derive(Clone, Default)]
pub struct Tasks {
    /// Tracks every task.
    pub tracker: TaskTracker,
    /// Cancels every task.
    pub cancel: CancellationToken,
}
