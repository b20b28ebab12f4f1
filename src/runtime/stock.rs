//! A runtime's stock of restored, loaded clones (module doc, step 2): an
//! instance engine ([`crate::pool::engine`]) whose members are taken out
//! for good, one per app start ([`Runtime::take`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::info;

use super::{current_code, CodeSource, RuntimeError, RuntimeMetrics, StartSpec};
use crate::pool::engine::{Observer, Sizing, StartFailure, Stats, StopReason};
use crate::pool::{Engine, Factory, SnapshotFactory, Tasks};
use crate::vmm::{Vm, VmId, Vmm};

/// The directory name of a runtime's snapshots under `snapshot_dir` (app
/// names cannot contain a dot, so it never clashes with an app's).
pub fn snapshot_name(runtime: &str) -> String {
    format!("runtime.{runtime}")
}

/// A runtime's stock of clones. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    name: String,
    engine: Engine<SnapshotFactory>,
    metrics: RuntimeMetrics,
}

struct StockObserver {
    name: String,
    metrics: RuntimeMetrics,
}

impl Observer for StockObserver {
    fn publish(&self, s: &Stats) {
        self.metrics
            .set(&self.name, s.warm() as i64, s.restoring as i64);
    }
    fn restored(&self, _took: Duration) {}
    fn restore_failed(&self, failure: &StartFailure, took: Duration) {
        self.metrics.restore_failed(
            &self.name,
            failure.reason(),
            crate::display_chain(failure),
            took,
        );
    }
    fn stopped(&self, _why: StopReason, _lived: Duration) {}
    fn instance_failed(&self) {
        self.metrics.failed(&self.name);
    }
}

impl Runtime {
    /// The stock of runtime `name`: clones made by `factory` (restores of
    /// its snapshot), `min_warm` of them kept ready, each start bounded by
    /// `start_timeout`; its tasks run on `tasks`.
    pub fn start(
        name: &str,
        factory: SnapshotFactory,
        min_warm: usize,
        start_timeout: Duration,
        metrics: RuntimeMetrics,
        tasks: &Tasks,
    ) -> Runtime {
        metrics.init(name);
        let sizing = Sizing {
            min_warm,
            // Clones leave the stock when taken; restores for takers are
            // bounded by the takers waiting, and a clone whose taker gave up
            // is stopped as it joins (engine doc, step 6).
            max_instances: usize::MAX,
            max_concurrency: 1,
            idle_timeout: None,
            start_timeout,
            hold_queue: usize::MAX,
            // A taker is bounded by its own app's start_timeout.
            hold_timeout: Duration::from_secs(24 * 3600),
        };
        let observer = Arc::new(StockObserver {
            name: name.to_owned(),
            metrics: metrics.clone(),
        });
        let engine_name = snapshot_name(name).replace('.', "-");
        let engine = Engine::new(engine_name, sizing, factory, observer, tasks);
        Runtime {
            name: name.to_owned(),
            engine,
            metrics,
        }
    }

    /// (warm clones, restores in flight).
    pub fn stock(&self) -> (usize, usize) {
        let s = self.engine.stats();
        (s.warm(), s.restoring)
    }

    /// How many warm clones the stock keeps.
    pub fn min_warm(&self) -> usize {
        self.engine.sizing().min_warm
    }

    /// The error of the last failed restore, while restores fail.
    pub fn last_error(&self) -> Option<String> {
        self.engine.last_error().map(|(e, _)| e)
    }

    /// VMM process ids of the clones in the stock.
    pub fn pids(&self) -> Vec<u32> {
        self.engine.each(Vm::pid)
    }

    /// The driver the clones run on.
    pub fn vmm(&self) -> &Arc<dyn Vmm> {
        self.engine.factory().vmm()
    }

    /// A loaded clone, taken out of the stock for good: a warm one if
    /// there is one, else the next one restored.
    pub async fn take(&self) -> Result<Vm, RuntimeError> {
        loop {
            // A failed restore is counted once, by the stock's observer.
            let (lease, held) =
                self.engine
                    .claim()
                    .await
                    .map_err(|source| RuntimeError::Stock {
                        runtime: self.name.clone(),
                        source,
                    })?;
            // A clone whose VMM died in the stock is stopped; take the next.
            if let Some(vm) = lease.detach() {
                let outcome = if held { "restored" } else { "warm" };
                self.metrics.took(&self.name, outcome);
                return Ok(vm);
            }
        }
    }

    /// Stops restoring and destroys the clones in the stock, waiting at
    /// most `within` ([`Engine::close`]).
    pub async fn close(&self, within: Duration) {
        self.engine.close(within).await;
    }
}

/// Starts instances of one runtime app from its runtime's stock (module
/// doc, step 3).
pub struct RuntimeFactory {
    runtime: Runtime,
    code: Arc<CodeSource>,
    start: StartSpec,
    fence: Option<crate::pool::vm::Admission>,
}

impl RuntimeFactory {
    /// Instances of the app of `start`, with code from `code`, in `runtime`.
    pub fn new(runtime: Runtime, code: CodeSource, start: StartSpec) -> RuntimeFactory {
        RuntimeFactory {
            runtime,
            code: Arc::new(code),
            start,
            fence: None,
        }
    }

    /// Makes each clone's fence slot the app's as the clone becomes the
    /// app's.
    pub fn with_fence(mut self, admission: Option<crate::pool::vm::Admission>) -> RuntimeFactory {
        self.fence = admission;
        self
    }
}

#[async_trait]
impl Factory for RuntimeFactory {
    type Instance = Vm;
    type Error = RuntimeError;

    async fn start(&self, id: VmId) -> Result<Vm, RuntimeError> {
        let image = current_code(&self.code, &self.start.app).await?;
        let mut vm = self.runtime.take().await?;
        info!(app = %self.start.app, instance = %id, vm = %vm.id(), code = %&image.hash[..16], "starting the app in a runtime clone");
        let vmm = self.runtime.vmm().as_ref();
        if let Some(fence) = &self.fence {
            if let Err(e) = fence.assign(&mut vm).await {
                let e = crate::vmm::VmmError::from(e);
                return Err(crate::vmm::discard(vmm, vm, e).await.into());
            }
        }
        match super::start_app(vmm, &mut vm, Some(&image.path), &self.start).await {
            Ok(()) => Ok(vm),
            // The clone is spent: it may hold half-started app state.
            Err(e) => Err(crate::vmm::discard(vmm, vm, e).await),
        }
    }

    async fn stop(&self, vm: Vm) -> Result<(), RuntimeError> {
        Ok(self.runtime.vmm().destroy(vm).await?)
    }
}
