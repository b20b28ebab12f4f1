//! The edge workers: one thread per core, each running its own
//! single-threaded tokio runtime, serving the connections it accepted from
//! start to end, as nginx's worker processes do.
//!
//! A connection's tasks (its hyper connection, the upstream connections it
//! opens, its HTTP/2 streams, its tunnel) stay on one thread: a warm
//! forward wakes no other thread. On a multi-threaded runtime the client
//! and upstream halves of a forward run on whichever worker is free and
//! wake each other across threads (BENCHMARKS.md measures both). What
//! the workers share (the in-flight limit, the connection counts, the
//! pools and their engines, metrics) is behind atomics and locks held
//! briefly. The cost: one connection is served by one core, however busy
//! (an HTTP/2 connection carrying many clients' streams included), as an
//! nginx worker serves it.
//!
//! Protocol:
//! 1. [`Workers::start`] spawns `n` threads (`snapgate-edge-<i>`). Each
//!    builds a current-thread runtime, records its slot (`1..=n`, see
//!    [`slot`]), hands its runtime's handle back, then runs until `quit`.
//! 2. The gateway spawns every listener's accept loop on every worker,
//!    each over its own duplicate of the listening socket, registered with
//!    that worker's reactor before serving begins: the kernel wakes the
//!    workers for a new connection and one of them accepts it. A worker
//!    yields after each accept, so a burst of connections is spread over
//!    the workers that are free rather than taken by the first awake.
//! 3. An upstream HTTP/1.1 connection is driven by the reactor of the
//!    worker that opened it, and kept idle in that worker's slot
//!    (`upstream.rs`, step 2): a worker takes its own idle connections
//!    first, and another worker's only before dialing a new one (an app
//!    that serves one connection at a time still sees one). An h2c
//!    connection is one per upstream, shared by every worker, and driven
//!    by the worker that opened it (`upstream.rs`, step 6).
//! 4. Pools, restores and everything else of the gateway live on the
//!    runtime the gateway was started on (the control runtime); a request
//!    on a worker waits for a claim there through channels, which wake
//!    across runtimes.
//! 5. A worker about to park hands the memory freed on it back to the
//!    system when client connections have ended or parked since its last
//!    hand-back, at most every 100 ms (`hand_back`).
//! 6. Stop ([`Workers::stop`]), after the gateway's tasks have ended
//!    (those on the workers are driven until then): `quit` is cancelled,
//!    each worker drops its runtime (cancelling whatever is left on it) and
//!    reports that it ended. Dropping [`Workers`] without a stop cancels
//!    `quit` too; the threads end on their own.

use std::cell::Cell;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio_util::sync::{CancellationToken, DropGuard};

thread_local! {
    /// This thread's worker slot: 0 on any thread that is no edge worker.
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// The worker slot of the calling thread: `1..=n` on the `n` edge
/// workers, 0 on any other thread (the control runtime, tests).
pub fn slot() -> usize {
    SLOT.get()
}

/// How many slots per-slot state needs: one per core, plus slot 0.
/// [`Workers::start`] never starts more workers than this allows.
pub fn slots() -> usize {
    static SLOTS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SLOTS.get_or_init(|| cores() + 1)
}

/// The cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// How many workers `workers` (the config key; `None`: one per core)
/// starts: at least 1, at most [`cores`].
pub fn count(asked: Option<usize>) -> usize {
    asked.unwrap_or_else(cores).clamp(1, slots() - 1)
}

/// The running edge workers.
pub struct Workers {
    handles: Vec<Handle>,
    ended: Vec<tokio::sync::oneshot::Receiver<()>>,
    quit: Option<DropGuard>,
}

impl Workers {
    /// Starts `n` workers (at least 1, at most [`cores`]): protocol step 1.
    ///
    /// # Errors
    /// A thread or runtime that cannot be made (out of threads or fds).
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let n = count(Some(n));
        let quit = CancellationToken::new();
        // Armed first: if a later worker cannot start, those started end.
        let guard = quit.clone().drop_guard();
        let mut handles = Vec::with_capacity(n);
        let mut ended = Vec::with_capacity(n);
        for i in 1..=n {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
            let quit = quit.clone();
            std::thread::Builder::new()
                .name(format!("snapgate-edge-{i}"))
                .spawn(move || {
                    SLOT.set(i);
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .on_thread_park(hand_back)
                        .build();
                    let rt = match rt {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(rt.handle().clone()));
                    rt.block_on(quit.cancelled());
                    drop(rt);
                    let _ = ended_tx.send(());
                })?;
            let handle = handle_rx
                .recv()
                .map_err(|_| std::io::Error::other("edge worker ended while starting"))??;
            handles.push(handle);
            ended.push(ended_rx);
        }
        Ok(Workers {
            handles,
            ended,
            quit: Some(guard),
        })
    }

    /// The workers' runtimes, to spawn accept loops on (step 2).
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Ends every worker and waits until each has dropped its runtime
    /// (step 6). Call it once the tasks on them have ended.
    pub async fn stop(&mut self) {
        drop(self.quit.take());
        for ended in self.ended.drain(..) {
            let _ = ended.await;
        }
    }
}

/// Step 5: `on_thread_park` of each worker. mimalloc hands a thread's
/// freed memory back only when that thread allocates again, so after a
/// burst (10,000 connections opened, then parked idle) what was freed
/// would stay resident. Traffic on kept-alive connections releases none
/// and never pays for a hand-back (at a fixed 10k requests a second, one
/// every 100 ms cost about 3% more CPU per request). What is freed in the
/// last 100 ms before a worker's final park stays.
fn hand_back() {
    thread_local! {
        /// When this worker last handed memory back, and the count of
        /// released connections then.
        static LAST: Cell<Option<(Instant, u64)>> = const { Cell::new(None) };
    }
    let released = super::connections_released();
    let last = LAST.get();
    if last.is_some_and(|(_, seen)| seen == released) {
        // Nothing released: not even the clock is read.
        return;
    }
    let now = Instant::now();
    if last.is_none_or(|(t, _)| now.duration_since(t) >= Duration::from_millis(100)) {
        LAST.set(Some((now, released)));
        // SAFETY: mi_collect has no preconditions and is thread safe: it
        // frees only pages with no live block and decommits only free
        // arena memory (process-wide), so no live allocation is touched.
        // Where mimalloc is not the global allocator (tests) it has
        // nothing to free.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_collect(true)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn workers_run_tasks_on_their_own_slots_and_end_when_stopped() {
        let mut workers = Workers::start(2.min(cores())).unwrap();
        assert_eq!(slot(), 0, "the test's thread is no worker");
        let mut seen = Vec::new();
        for handle in workers.handles() {
            seen.push(handle.spawn(async { slot() }).await.unwrap());
        }
        let want: Vec<usize> = (1..=workers.handles().len()).collect();
        assert_eq!(seen, want);
        // A task still running on a worker is dropped with its runtime.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        workers.handles()[0].spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        workers.stop().await;
        assert!(rx.await.is_err(), "the pending task was dropped");
    }

    #[test]
    fn the_count_is_one_per_core_unless_asked_and_never_above() {
        assert_eq!(count(None), cores());
        assert_eq!(count(Some(1)), 1);
        assert_eq!(count(Some(10_000)), cores());
    }

    #[test]
    fn no_more_workers_than_slots() {
        let workers = Workers::start(10_000).unwrap();
        assert_eq!(workers.handles().len(), slots() - 1);
        drop(workers);
    }
}
