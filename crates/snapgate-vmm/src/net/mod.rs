//! Host networking for VMs: one tap per VM instance.
//!
//! # Why one tap per clone, all with the same addresses
//! Every clone restored from one snapshot wakes up with the template's guest
//! IP and MAC, and remembers the template host's MAC in its ARP cache. So each
//! clone gets its own tap, and every tap looks the same from the guest: the
//! same host address (`host_ip/prefix_len`) and one fixed host MAC. The host
//! tells clones apart by binding client sockets to the clone's tap
//! (`SO_BINDTODEVICE`), never by address.
//!
//! The alternative, one network namespace per clone (with a veth pair and NAT
//! to reach it), isolates clones further but costs a namespace and a veth pair
//! per restore and makes every proxied connection enter a namespace. Bound
//! sockets on plain taps need neither, and the kernel keeps one connected
//! route per tap, so a bound socket always picks its own tap.
//!
//! `rp_filter` is set to 2 (loose) on each tap: the effective value is the
//! maximum of `all` and the interface's own, and with strict filtering every
//! reply from a clone would be dropped because the reverse route for
//! `guest_ip` points at the first tap. IPv6 is turned off on the taps so no
//! router solicitation or DAD traffic wakes the guests.
//!
//! The default addresses are link-local (169.254.0.0/16): they mean something
//! only on their own link, which is exactly what a per-VM tap is.
//!
//! # Lifetimes
//! Taps are created with the TUNSETIFF ioctl (the kernel refuses tun/tap
//! creation over rtnetlink) and are *not* persistent: the tap exists while an
//! fd on it is open. [`Tap::take_fd`] hands that fd to the VMM process and our
//! copy is closed right after the spawn, so a VMM that exits or crashes takes
//! its tap with it. A tap still present at start-up (a previous run was
//! killed while its VMMs lived on) is deleted by [`Network::remove_taps`]
//! once those VMMs are killed, by the name recorded with each VMM's pid.

mod fence;
mod tap;

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::TryStreamExt;
use netlink_packet_route::link::LinkAttribute;
use serde::{Deserialize, Serialize};

use crate::FieldError;

pub use fence::{Egress, Fence, FenceSlot};
pub use tap::{Admitting, Tap};

/// Errors from host networking. Each names the tap or setting at fault.
// Variant docs say when each happens; field names say the rest.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Opening the netlink socket failed.
    #[error("cannot open a netlink socket")]
    Netlink(#[source] std::io::Error),
    /// Creating a tap device failed.
    #[error("cannot create tap {name}")]
    CreateTap {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// A netlink request about a tap failed.
    #[error("netlink: cannot {what} on {name}")]
    Link {
        what: &'static str,
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// Writing a sysctl under /proc/sys failed.
    #[error("cannot set {path}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The network settings are inconsistent.
    #[error("network.{0}")]
    Invalid(FieldError),
    /// The fence's nftables rules or routing could not be applied.
    #[error("network.fence: {problem}")]
    Fence { problem: String },
}

/// A MAC address, written `aa:bb:cc:dd:ee:ff` in config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac(pub [u8; 6]);

impl TryFrom<String> for Mac {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Mac> for String {
    fn from(m: Mac) -> String {
        m.to_string()
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || format!("{s:?} is not a MAC address (want aa:bb:cc:dd:ee:ff)");
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        Ok(Mac(mac))
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Addressing shared by every VM tap (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetParams {
    /// Name prefix of the taps this gateway owns (1-6 of `[a-z0-9]`).
    pub tap_prefix: String,
    /// Host side address of every tap.
    pub host_ip: Ipv4Addr,
    /// The guest's address (the same in every clone of a snapshot).
    pub guest_ip: Ipv4Addr,
    /// Prefix length of the tap subnet.
    pub prefix_len: u8,
    /// MAC of the host side of every tap.
    pub host_mac: Mac,
    /// MAC of the guest's NIC (kept by clones from their template).
    pub guest_mac: Mac,
    /// Whether snapgate fences its taps with nftables ([`Fence`]): a guest
    /// reaches the host only in replies, no other tap, and no other
    /// network but its app's `egress`. Off only by the operator's choice.
    pub fence: bool,
}

impl Default for NetParams {
    fn default() -> Self {
        NetParams {
            tap_prefix: "sgtap".into(),
            host_ip: Ipv4Addr::new(169, 254, 100, 1),
            guest_ip: Ipv4Addr::new(169, 254, 100, 2),
            prefix_len: 30,
            host_mac: Mac([0x02, 0x73, 0x67, 0x00, 0x00, 0x01]),
            guest_mac: Mac([0x02, 0x73, 0x67, 0x00, 0x00, 0x02]),
            fence: true,
        }
    }
}

impl NetParams {
    /// The subnet mask, dotted (`255.255.255.252`).
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }

    /// Checks the prefix, the prefix length and that both addresses share a
    /// subnet.
    pub fn validate(&self) -> Result<(), FieldError> {
        let p = &self.tap_prefix;
        if p.is_empty()
            || p.len() > 6
            || !p
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(FieldError::new(
                "tap_prefix",
                format!("{p:?} must be 1 to 6 characters of [a-z0-9]"),
            ));
        }
        if !(8..=30).contains(&self.prefix_len) {
            return Err(FieldError::new(
                "prefix_len",
                format!("{} must be between 8 and 30", self.prefix_len),
            ));
        }
        let mask = u32::from(self.netmask());
        if u32::from(self.host_ip) & mask != u32::from(self.guest_ip) & mask {
            return Err(FieldError::new(
                "guest_ip",
                format!(
                    "{} is not in the subnet of host_ip {}/{}",
                    self.guest_ip, self.host_ip, self.prefix_len
                ),
            ));
        }
        if self.host_ip == self.guest_ip {
            return Err(FieldError::new("guest_ip", "must differ from host_ip"));
        }
        Ok(())
    }
}

const PID_SLOTS: u64 = 36 * 36 * 36;
const TAPS_PER_PID: u64 = 36 * 36 * 36 * 36;

/// Creates and removes this gateway's taps.
#[derive(Clone)]
pub struct Network {
    params: Arc<NetParams>,
    handle: rtnetlink::Handle,
    next: Arc<AtomicU64>,
    /// The netlink connection's driver: ends when the last clone of this
    /// `Network` is dropped.
    _conn: Arc<tokio_util::task::AbortOnDropHandle<()>>,
}

impl Network {
    /// Opens a netlink connection (its driver runs on the current tokio
    /// runtime, owned by the returned value and its clones) for taps named
    /// `<tap_prefix><n>`.
    pub fn new(params: NetParams) -> Result<Self, NetError> {
        params.validate().map_err(NetError::Invalid)?;
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Netlink)?;
        let conn = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(conn));
        // Number taps from a pid-derived base so two gateways (or two test
        // processes) sharing a prefix are unlikely to race for a name; a
        // clash is still caught by TUNSETIFF's EBUSY and retried with the
        // next number. Names stay within IFNAMSIZ (see the unit test).
        let seed = (u64::from(std::process::id()) % PID_SLOTS) * TAPS_PER_PID;
        Ok(Network {
            params: Arc::new(params),
            handle,
            next: Arc::new(AtomicU64::new(seed)),
            _conn: Arc::new(conn),
        })
    }

    /// The addressing every tap gets.
    pub fn params(&self) -> &NetParams {
        &self.params
    }

    /// Creates a tap, gives it the host MAC and address, turns off IPv6 and
    /// strict reverse-path filtering, and brings it up.
    pub async fn create_tap(&self) -> Result<Tap, NetError> {
        let mut tap = loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let name = format!("{}{}", self.params.tap_prefix, base36(n));
            match Tap::create(&name) {
                Err(NetError::CreateTap { source, .. })
                    if source.raw_os_error() == Some(nix::libc::EBUSY) =>
                {
                    continue
                }
                other => break other?,
            }
        };
        let name = tap.name().to_owned();
        let link_err = |what: &'static str| {
            let name = name.clone();
            move |source| NetError::Link { what, name, source }
        };
        let index = self.link_index(&name).await?;
        tap.set_index(index);
        // Hosts booted with ipv6.disable=1 have no IPv6 sysctls: nothing to turn off.
        let ipv6 = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
        if Path::new(&ipv6).exists() {
            set_sysctl(&ipv6, "1")?;
        }
        set_sysctl(&format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"), "2")?;
        self.handle
            .address()
            .add(index, self.params.host_ip.into(), self.params.prefix_len)
            .execute()
            .await
            .map_err(link_err("add the address"))?;
        // MAC and link state in one request: one round trip less per clone.
        self.handle
            .link()
            .set(index)
            .address(self.params.host_mac.0.to_vec())
            .up()
            .execute()
            .await
            .map_err(link_err("set the MAC and bring up"))?;
        Ok(tap)
    }

    async fn link_index(&self, name: &str) -> Result<u32, NetError> {
        let msg = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_next()
            .await
            .map_err(|source| NetError::Link {
                what: "look up",
                name: name.to_owned(),
                source,
            })?;
        msg.map(|m| m.header.index).ok_or_else(|| NetError::Link {
            what: "look up",
            name: name.to_owned(),
            source: rtnetlink::Error::RequestFailed,
        })
    }

    /// Names of existing links that carry this gateway's tap prefix.
    pub async fn list_taps(&self) -> Result<Vec<(u32, String)>, NetError> {
        list_links_with_prefix(&self.handle, &self.params.tap_prefix).await
    }

    /// Deletes the taps named in `names` that still exist: leftovers of a
    /// run that died, recorded with its VMMs. Taps of the same prefix that
    /// nothing recorded are left alone (they may be another gateway's).
    /// Call it after the VMMs holding them were killed.
    pub async fn remove_taps(&self, names: &[String]) -> Result<Vec<String>, NetError> {
        let mut removed = Vec::new();
        for (index, name) in self.list_taps().await? {
            if !names.contains(&name) {
                continue;
            }
            match self.handle.link().del(index).execute().await {
                Ok(()) => removed.push(name),
                // Gone in the meantime: its last fd closed.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -nix::libc::ENODEV => {}
                Err(source) => {
                    return Err(NetError::Link {
                        what: "delete",
                        name,
                        source,
                    })
                }
            }
        }
        Ok(removed)
    }
}

async fn list_links_with_prefix(
    handle: &rtnetlink::Handle,
    prefix: &str,
) -> Result<Vec<(u32, String)>, NetError> {
    let mut links = handle.link().get().execute();
    let mut found = Vec::new();
    let err = |source| NetError::Link {
        what: "list links",
        name: format!("{prefix}*"),
        source,
    };
    while let Some(msg) = links.try_next().await.map_err(err)? {
        for attr in &msg.attributes {
            if let LinkAttribute::IfName(name) = attr {
                if name.starts_with(prefix) {
                    found.push((msg.header.index, name.clone()));
                }
            }
        }
    }
    Ok(found)
}

fn set_sysctl(path: &str, value: &str) -> Result<(), NetError> {
    std::fs::write(path, value).map_err(|source| NetError::Sysctl {
        path: path.to_owned(),
        source,
    })
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii digits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_and_rejects_garbage() {
        let mac: Mac = "02:73:67:00:00:0a".parse().unwrap();
        assert_eq!(mac.0, [2, 0x73, 0x67, 0, 0, 10]);
        assert_eq!(mac.to_string(), "02:73:67:00:00:0a");
        assert!("02:73:67:00:00".parse::<Mac>().is_err());
        assert!("02:73:67:00:00:zz".parse::<Mac>().is_err());
    }

    #[test]
    fn netmask_and_validation() {
        let p = NetParams::default();
        assert_eq!(p.netmask(), Ipv4Addr::new(255, 255, 255, 252));
        assert!(p.validate().is_ok());
        let bad = NetParams {
            guest_ip: Ipv4Addr::new(169, 254, 101, 2),
            ..NetParams::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "guest_ip");
        let bad = NetParams {
            tap_prefix: "Tap-".into(),
            ..NetParams::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "tap_prefix");
    }

    #[test]
    fn tap_names_fit_ifnamsiz() {
        // A 6-char prefix + the largest seeded number must stay <= 15.
        let n = PID_SLOTS * TAPS_PER_PID - 1;
        assert!(6 + base36(n).len() <= 15, "{}", base36(n));
    }
}
