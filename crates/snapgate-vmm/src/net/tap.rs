//! One tap device and the fd that keeps it alive.

#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};

use super::NetError;

/// A non-persistent tap. While this value holds the fd, dropping it removes
/// the tap; after [`Tap::take_fd`] the tap lives exactly as long as whoever
/// holds the fd (the VMM process).
#[derive(Debug)]
pub struct Tap {
    name: String,
    /// Its interface index (0 until [`super::Network::create_tap`] set it
    /// up).
    index: u32,
    fd: Option<OwnedFd>,
    admission: Option<Admitting>,
}

/// A tap's admission to the fence ([`super::Fence::admit`]) under way on
/// a task of its own, so that it overlaps the VMM's start. The driver that
/// starts a VM on the tap takes it ([`Tap::take_admission`]) and awaits it
/// before the guest's first instruction, then keeps the slot with the VM
/// ([`crate::Vm::keep_fence_slot`]). Dropped unawaited (a start that failed
/// or was cancelled first), the task is aborted, as the admission would
/// have been had it run inline: what it did is undone by its slot's guard
/// (the map elements, while the runtime runs) or goes with the tap (the
/// route).
#[derive(Debug)]
pub struct Admitting(Option<tokio::task::JoinHandle<Result<super::FenceSlot, NetError>>>);

impl Admitting {
    /// Waits for the admission. Errors: the fence's, or
    /// [`NetError::Fence`] if its task panicked or was cancelled (the
    /// runtime shutting down).
    pub async fn finish(mut self) -> Result<super::FenceSlot, NetError> {
        let task = self.0.take().expect("an admission is finished once");
        task.await.map_err(|e| NetError::Fence {
            problem: format!("admitting a tap: {e}"),
        })?
    }
}

impl Drop for Admitting {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

impl Tap {
    /// Creates `name` with TUNSETIFF as `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`
    /// (Cloud Hypervisor requires the virtio-net header; QEMU probes it).
    pub(super) fn create(name: &str) -> Result<Tap, NetError> {
        let mut config = tun::Configuration::default();
        config.tun_name(name).layer(tun::Layer::L2);
        config.platform_config(|p| {
            p.vnet_hdr(true);
            // Addresses and link state are set over netlink, not ioctls.
            p.ensure_root_privileges(false);
        });
        let device = tun::create(&config).map_err(|e| NetError::CreateTap {
            name: name.to_owned(),
            source: match e {
                tun::Error::Io(io) => io,
                other => std::io::Error::other(other),
            },
        })?;
        let raw = device.into_raw_fd();
        // SAFETY: `into_raw_fd` transfers ownership of an open fd (opened with
        // O_CLOEXEC, so concurrent spawns do not inherit it); nothing else
        // closes it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Tap {
            name: name.to_owned(),
            index: 0,
            fd: Some(fd),
            admission: None,
        })
    }

    /// Gives the tap its fence admission, started on a task of its own
    /// (see [`Admitting`]).
    pub fn admitting(&mut self, task: tokio::task::JoinHandle<Result<super::FenceSlot, NetError>>) {
        self.admission = Some(Admitting(Some(task)));
    }

    /// Takes the admission under way, if any: the driver awaits it before
    /// the guest runs (see [`Admitting`]).
    pub fn take_admission(&mut self) -> Option<Admitting> {
        self.admission.take()
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface index.
    pub fn index(&self) -> u32 {
        self.index
    }

    pub(super) fn set_index(&mut self, index: u32) {
        self.index = index;
    }

    /// Takes the fd to hand it to a VMM. Panics if it was taken already.
    pub fn take_fd(&mut self) -> OwnedFd {
        self.fd.take().expect("tap fd already handed to a VMM")
    }
}
