//! VMs as engine instances, and the factory that restores them from a
//! snapshot.

use std::sync::Arc;

use async_trait::async_trait;

use super::engine::{Blame, ExitEvent, Factory, Instance, StartError};
use crate::net::Network;
use crate::vmm::resumed::{self, Hook};
use crate::vmm::{Endpoint, Snapshot, Vm, VmId, Vmm, VmmError};

impl Instance for Vm {
    type Address = Endpoint;

    fn name(&self) -> String {
        self.id().to_string()
    }

    fn address(&self) -> Endpoint {
        self.endpoint().clone()
    }

    fn has_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process_mut().exited()
    }

    fn is_exiting(&mut self) -> bool {
        self.process_mut().is_exiting()
    }

    fn exited(&self) -> ExitEvent {
        Box::pin(self.process().exit_event())
    }
}

impl StartError for VmmError {}

/// Why an app's instance did not start: its factory's own error, and
/// whose fault it was ([`StartError::blame`]).
#[derive(Debug)]
pub struct InstanceError(Box<dyn StartError>);

impl InstanceError {
    /// Wraps a factory's error.
    pub fn new(e: impl StartError) -> InstanceError {
        InstanceError(Box::new(e))
    }
}

impl std::fmt::Display for InstanceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for InstanceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl StartError for InstanceError {
    fn blame(&self) -> Blame {
        self.0.blame()
    }
}

/// Starts and stops an app's VMs, whichever way they start: the
/// object-safe face of every [`Factory`] of VMs.
#[async_trait]
pub trait StartsVms: Send + Sync + 'static {
    /// [`Factory::start`].
    async fn start_vm(&self, id: VmId) -> Result<Vm, InstanceError>;
    /// [`Factory::stop`].
    async fn stop_vm(&self, vm: Vm) -> Result<(), InstanceError>;
}

/// How an app's instances start: the `path` label of
/// `snapgate_cold_start_duration_seconds` for a request held while one
/// started. No path boots a VM: every app's instances are restored from
/// a snapshot that was built (booted once) before the app was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartPath {
    /// Restored from the app's own snapshot (a VM app, or a runtime app
    /// with `snapshot: app`).
    Clone,
    /// A clone of the runtime's snapshot taken from its stock (restored
    /// on the spot if the stock is empty), the app's code attached and
    /// started in it (a runtime app with `snapshot: runtime`).
    RuntimeClone,
}

impl StartPath {
    /// Its label value.
    pub fn as_str(self) -> &'static str {
        match self {
            StartPath::Clone => "clone",
            StartPath::RuntimeClone => "runtime_clone",
        }
    }
}

/// The factory of an app's pool: any [`Factory`] of VMs, its errors
/// made [`InstanceError`]s, and how it starts them.
#[derive(Clone)]
pub struct AppFactory(Arc<dyn StartsVms>, StartPath);

impl AppFactory {
    /// `f`, as an app's factory whose instances start by `path`.
    pub fn new(f: impl Factory<Instance = Vm>, path: StartPath) -> AppFactory {
        AppFactory(Arc::new(f), path)
    }

    /// How its instances start.
    pub fn path(&self) -> StartPath {
        self.1
    }
}

#[async_trait]
impl Factory for AppFactory {
    type Instance = Vm;
    type Error = InstanceError;

    async fn start(&self, id: VmId) -> Result<Vm, InstanceError> {
        self.0.start_vm(id).await
    }

    async fn stop(&self, vm: Vm) -> Result<(), InstanceError> {
        self.0.stop_vm(vm).await
    }
}

#[async_trait]
impl<F: Factory<Instance = Vm>> StartsVms for F {
    async fn start_vm(&self, id: VmId) -> Result<Vm, InstanceError> {
        self.start(id).await.map_err(InstanceError::new)
    }

    async fn stop_vm(&self, vm: Vm) -> Result<(), InstanceError> {
        self.stop(vm).await.map_err(InstanceError::new)
    }
}

/// Restores instances from a snapshot, each on its own tap, and makes each
/// its own before it serves: its resume [`Hook`] (if any: a VM app's
/// `on_restore`, a runtime agent's `/resumed`) gets the resumed message as
/// soon as the hook's service is ready ([`resumed::ready_and_resumed`]).
/// Cancel-safe: a dropped start drops its `Vm`, which kills the VMM.
pub struct SnapshotFactory {
    vmm: Arc<dyn Vmm>,
    net: Network,
    snapshot: Snapshot,
    hook: Option<Hook>,
    fence: Option<Admission>,
}

/// Gives each VM its tap's slot in the fence ([`crate::net::Fence::admit`]):
/// the VMs of `app`, or of no app yet (a runtime's stock).
#[derive(Clone, Debug)]
pub struct Admission {
    fence: Arc<crate::net::Fence>,
    app: Option<String>,
}

impl Admission {
    /// VMs of `app` (`None`: of no app yet), admitted by `fence`.
    pub fn new(fence: Arc<crate::net::Fence>, app: Option<&str>) -> Admission {
        Admission {
            fence,
            app: app.map(str::to_owned),
        }
    }

    /// Admits `tap` (interface `index`) before its guest runs: the VM keeps
    /// the slot until it
    /// is dropped ([`Vm::keep_fence_slot`]).
    pub async fn admit(
        &self,
        tap: &str,
        index: u32,
    ) -> Result<crate::net::FenceSlot, crate::net::NetError> {
        self.fence.admit(tap, index, self.app.as_deref()).await
    }

    /// Makes `vm` (admitted as a runtime's) this admission's app's.
    pub async fn assign(&self, vm: &mut Vm) -> Result<(), crate::net::NetError> {
        if let (Some(app), Some(slot)) = (&self.app, vm.fence_slot_mut()) {
            self.fence.assign(slot, app).await?;
        }
        Ok(())
    }
}

impl SnapshotFactory {
    /// Instances of `snapshot`, restored by `vmm` onto taps from `net`,
    /// each sent its resumed message at `hook` first.
    pub fn new(
        vmm: Arc<dyn Vmm>,
        net: Network,
        snapshot: Snapshot,
        hook: Option<Hook>,
    ) -> SnapshotFactory {
        SnapshotFactory {
            vmm,
            net,
            snapshot,
            hook,
            fence: None,
        }
    }

    /// Admits each VM's tap to the fence before it serves.
    pub fn with_fence(mut self, admission: Option<Admission>) -> SnapshotFactory {
        self.fence = admission;
        self
    }

    /// The driver it restores with.
    pub fn vmm(&self) -> &Arc<dyn Vmm> {
        &self.vmm
    }
}

#[async_trait]
impl Factory for SnapshotFactory {
    type Instance = Vm;
    type Error = VmmError;

    async fn start(&self, id: VmId) -> Result<Vm, VmmError> {
        let mut tap = self.net.create_tap().await?;
        // Admitted to the fence while the VMM starts; the driver runs the
        // guest only once that is done (crate::net::Admitting).
        if let Some(fence) = &self.fence {
            let (fence, name, index) = (fence.clone(), tap.name().to_owned(), tap.index());
            tap.admitting(tokio::spawn(async move { fence.admit(&name, index).await }));
        }
        let mut vm = self.vmm.restore(id, &self.snapshot, tap).await?;
        vm.set_restored_from(self.snapshot.dir());
        let ready_timeout = self.snapshot.manifest().spec.ready_timeout;
        let vmm = self.vmm.as_ref();
        match resumed::ready_and_resumed(vmm, &mut vm, self.hook.as_ref(), ready_timeout).await {
            Ok(()) => Ok(vm),
            Err(e) => Err(crate::vmm::discard(vmm, vm, e).await),
        }
    }

    async fn stop(&self, vm: Vm) -> Result<(), VmmError> {
        self.vmm.destroy(vm).await
    }
}
