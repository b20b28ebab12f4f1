//! Watching a guest while snapgate waits on it.
//!
//! A guest can stop without its VMM exiting: OSv halts its CPU after a
//! fatal error or when it finds no clock it can use, a Linux guest halts
//! after `reboot(RB_HALT_SYSTEM)` or spins after a panic without
//! `panic=-1`. Waiting on its readiness probe would then last the whole
//! `ready_timeout`. So every wait on a guest (its readiness, a resumed
//! message, an app's start) runs under [`guarded`]:
//!
//! 1. The wait and a watch run side by side; whichever ends first wins, and
//!    the other is dropped (the wait's futures hold no VM state).
//! 2. The watch ends at once when the VMM process exits, and otherwise
//!    every [`EVERY`] asks the driver whether the guest stopped
//!    ([`Vmm::guest_stopped`]: for QEMU, its run state and whether every
//!    vCPU is halted with interrupts off; for Cloud Hypervisor, its VM
//!    state).
//! 3. A guest seen stopped at two checks in a row (a vCPU can be caught in
//!    a passing `hlt` with interrupts off by one sample, never by two
//!    [`EVERY`] apart) ends the wait with [`VmmError::GuestStopped`],
//!    which quotes the guest's own last error line from its console, found
//!    anywhere in the console's tail, not only in its last lines (a stack
//!    trace after it would push it out).

use std::future::Future;
use std::time::Duration;

use super::{Vm, Vmm, VmmError};

/// How often the watch asks whether the guest stopped.
pub const EVERY: Duration = Duration::from_millis(250);

/// Waits until the VMM exits or its guest is seen stopped twice in a row
/// (module doc); returns the error that says so. Never returns otherwise.
pub async fn watch(vmm: &dyn Vmm, vm: &mut Vm, during: &'static str) -> VmmError {
    let mut stopped_before = false;
    loop {
        tokio::select! {
            _ = vm.process_mut().exit() => return vm.process_mut().exited_error(during),
            _ = tokio::time::sleep(EVERY) => {}
        }
        match vmm.guest_stopped(vm).await {
            Some(why) if stopped_before => {
                return VmmError::GuestStopped {
                    vm: vm.id().clone(),
                    during,
                    why,
                    error_line: vm.process().console_error_line(),
                    console_tail: vm.process().log_tail(),
                }
            }
            Some(_) => stopped_before = true,
            None => stopped_before = false,
        }
    }
}

/// Runs `wait` while watching `vm` (module doc): `wait`'s output, or the
/// error of a VMM that exited or a guest that stopped `during` it.
pub async fn guarded<T>(
    vmm: &dyn Vmm,
    vm: &mut Vm,
    during: &'static str,
    wait: impl Future<Output = T>,
) -> Result<T, VmmError> {
    tokio::select! {
        biased;
        out = wait => Ok(out),
        err = watch(vmm, vm, during) => Err(err),
    }
}
