//! Watching a guest while snapgate waits on it.
//!
//! A guest can stop without its VMM exiting: OSv halts its CPU after a
//! fatal error or when it finds no clock it can use, a Linux guest halts
//! after `reboot(RB_HALT_SYSTEM)`. Waiting on its readiness probe would
//! then last the whole `ready_timeout`. So every wait on a guest (its
//! readiness, a resumed message, an app's start) runs under [`guarded`].
//! (A Linux guest that panics without `panic=-1` spins with its CPU busy:
//! no driver can tell that from work, so give Linux guests `panic=-1`: the
//! kernel then reboots, and QEMU, run with `-no-reboot`, exits.)
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

use tracing::{debug, warn};

use super::{Vm, Vmm, VmmError};

/// How often the watch asks whether the guest stopped.
pub const EVERY: Duration = Duration::from_millis(250);
/// How long one such check may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits until the VMM exits or its guest is seen stopped twice in a row
/// (module doc); returns the error that says so. Never returns otherwise.
pub async fn watch(vmm: &dyn Vmm, vm: &mut Vm, during: &'static str) -> VmmError {
    let mut stopped_before = false;
    let mut can_wait = true;
    loop {
        tokio::select! {
            exit = vm.process_mut().exit(), if can_wait => match exit {
                Ok(_) => return vm.process_mut().exited_error(during),
                Err(e) => {
                    // Not expected of a child of ours; the checks below
                    // still see a VMM whose guest no longer answers.
                    warn!(vm = %vm.id(), "cannot wait on the VMM process: {e}");
                    can_wait = false;
                }
            },
            _ = tokio::time::sleep(EVERY) => {}
        }
        let stopped = match tokio::time::timeout(CHECK_TIMEOUT, vmm.guest_stopped(vm)).await {
            Ok(Ok(stopped)) => stopped,
            // Cannot tell this time (its control socket busy, the VMM on
            // its way out): the next check, or the process's exit, will.
            Ok(Err(e)) => {
                debug!(vm = %vm.id(), "checking the guest: {}", crate::display_chain(&e));
                None
            }
            Err(_) => {
                debug!(vm = %vm.id(), "checking the guest: no answer within {CHECK_TIMEOUT:?}");
                None
            }
        };
        match stopped {
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::path::Path;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::net::{NetParams, Tap};
    use crate::{Endpoint, ImageSpec, Snapshot, VmId, VmmKind};

    /// A driver whose guest_stopped answers are scripted (then `None`).
    struct Scripted {
        answers: Mutex<VecDeque<Option<String>>>,
        asked: Mutex<usize>,
        net: NetParams,
    }

    #[async_trait]
    impl Vmm for Scripted {
        fn kind(&self) -> VmmKind {
            VmmKind::Qemu
        }
        fn accel(&self) -> &str {
            "tcg"
        }
        fn net(&self) -> &NetParams {
            &self.net
        }
        async fn boot(&self, _: VmId, _: &ImageSpec, _: Tap) -> Result<Vm, VmmError> {
            unreachable!()
        }
        async fn guest_stopped(&self, _: &Vm) -> Result<Option<String>, VmmError> {
            *self.asked.lock().unwrap() += 1;
            Ok(self.answers.lock().unwrap().pop_front().flatten())
        }
        async fn snapshot(&self, _: Vm, _: &Path) -> Result<Snapshot, VmmError> {
            unreachable!()
        }
        async fn restore(&self, _: VmId, _: &Snapshot, _: Tap) -> Result<Vm, VmmError> {
            unreachable!()
        }
        async fn destroy(&self, _: Vm) -> Result<(), VmmError> {
            unreachable!()
        }
    }

    fn scripted(answers: &[Option<&str>]) -> Scripted {
        Scripted {
            answers: Mutex::new(answers.iter().map(|a| a.map(str::to_owned)).collect()),
            asked: Mutex::new(0),
            net: NetParams::default(),
        }
    }

    /// A "VM" whose VMM process is `sleep <secs>`.
    fn sleeping_vm(state: &Path, secs: &str) -> Vm {
        let id = VmId::new("watched");
        let process = crate::process::sleeping(state, &id, secs, None, true);
        std::fs::write(process.console_path(), "booting\nfatal: out of luck\n").unwrap();
        let spec: ImageSpec = serde_yaml_ng::from_str("kernel: /k\ncmdline: x\n").unwrap();
        let endpoint = Endpoint {
            tap: "none".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
        };
        Vm::new(id, endpoint, spec, "x".into(), process)
    }

    #[tokio::test]
    async fn a_guest_seen_stopped_twice_in_a_row_ends_the_wait() {
        let state = tempfile::tempdir().unwrap();
        let mut vm = sleeping_vm(state.path(), "30");
        // Once stopped, then running again: a passing sample, not a stop.
        let vmm = scripted(&[Some("halted"), None, Some("halted"), Some("halted")]);
        let watched = guarded(&vmm, &mut vm, "waiting", std::future::pending::<()>());
        let err = tokio::time::timeout(Duration::from_secs(30), watched)
            .await
            .expect("the watch ends the wait")
            .unwrap_err();
        assert_eq!(*vmm.asked.lock().unwrap(), 4);
        match err {
            VmmError::GuestStopped {
                why,
                during,
                error_line,
                ..
            } => {
                assert_eq!((why.as_str(), during), ("halted", "waiting"));
                assert_eq!(error_line.as_deref(), Some("fatal: out of luck"));
            }
            other => panic!("{other}"),
        }
    }

    #[tokio::test]
    async fn the_wait_wins_when_it_ends_first_and_an_exit_ends_it() {
        let state = tempfile::tempdir().unwrap();
        let mut vm = sleeping_vm(state.path(), "30");
        let vmm = scripted(&[]);
        let out = guarded(&vmm, &mut vm, "waiting", async { 7 })
            .await
            .unwrap();
        assert_eq!(out, 7);

        let mut quick = sleeping_vm(state.path(), "0");
        let watched = guarded(&vmm, &mut quick, "waiting", std::future::pending::<()>());
        let err = tokio::time::timeout(Duration::from_secs(30), watched)
            .await
            .expect("the exit ends the wait")
            .unwrap_err();
        assert!(matches!(err, VmmError::Exited { .. }), "{err}");
    }
}
