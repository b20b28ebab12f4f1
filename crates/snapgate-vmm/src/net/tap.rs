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
    fd: Option<OwnedFd>,
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
            fd: Some(fd),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Takes the fd to hand it to a VMM. Panics if it was taken already.
    pub fn take_fd(&mut self) -> OwnedFd {
        self.fd.take().expect("tap fd already handed to a VMM")
    }
}
