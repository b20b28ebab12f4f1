//! The fence: nftables rules, in a table of this gateway's own, that keep
//! traffic from its taps to what each app is allowed.
//!
//! # What a guest can reach
//! - The host: only TCP segments of connections snapgate opened to the
//!   guest. A connection a guest opens to any host address (the admin
//!   listener, another app's upstream, sshd, any service bound to all
//!   addresses), and any UDP or ICMP it sends the host, is rejected (ICMP
//!   administratively prohibited, so the guest's `connect` fails at once).
//!   Traffic between the host and its guests is not tracked (`notrack`):
//!   the rule is stateless, on the TCP flags (a segment with SYN and no
//!   ACK opens a connection), because every guest has the same address
//!   and two of snapgate's connections to two guests may have the same
//!   addresses and ports, which one conntrack entry would conflate; and it
//!   spares the proxied traffic conntrack's cost.
//! - Another tap: never, in either direction, whatever the host's
//!   forwarding settings.
//! - Other networks: nothing, unless the app's `egress` allows it (a list
//!   of CIDRs, each with optional ports, TCP and UDP); allowed traffic is
//!   masqueraded to the host's address on the way out. (A VM given a slot
//!   that a stopped VM held shares its conntrack zone: it could continue
//!   one of that VM's forwarded connections that conntrack still holds,
//!   had it the same ports. The zone is not flushed when a slot is
//!   claimed.) snapgate turns IPv4 forwarding on only on the taps
//!   of apps with egress; the host's outgoing interface must forward too
//!   (`net.ipv4.ip_forward`, or per interface), which snapgate leaves to
//!   the operator.
//!
//! # Why egress needs per-tap state
//! Every clone has the same guest address (module doc of [`super`]): a
//! reply to one clone's outgoing connection cannot be routed back by
//! address. Each tap of an app with egress gets a slot, which gives it
//!
//! 1. a conntrack zone for its original direction (`ct original zone`):
//!    two clones' connections with the same addresses and ports stay two
//!    connections;
//! 2. a packet mark, set on its packets and kept on the connection
//!    (`ct mark`), restored on the replies; the mark names the app (for the
//!    allow rules) and the slot;
//! 3. a policy-routing rule `fwmark <mark> lookup <mark>` with one route,
//!    the guest's address through the tap, so replies go back to the tap
//!    they belong to.
//!
//! Marks are `0x53` in the top byte, the app's number in the next 12 bits
//! and the slot in the low 12: 4095 apps with egress, 4095 VMs at once on
//! the host. Every tap gets a slot, egress or not: the host's own rejects
//! of a guest's packets carry its mark (`fwmark_reflect`) and so go back
//! to its tap, not to whichever tap has the first route to the guest
//! address.
//!
//! # Lifecycle (protocol)
//! 1. [`Fence::up`] at start-up writes the whole table in one `nft`
//!    transaction that first deletes a table of the same name: the
//!    leftovers of a run that died go with it. Until a gateway starts
//!    again, a dead gateway's table stays: its taps stay fenced.
//! 2. [`Fence::set_egress`] on every config load rewrites the `egress`
//!    chain in one transaction; taps keep their slots.
//! 3. [`Fence::admit`] when a VM gets its tap, on a task of its own that
//!    overlaps the VMM's start ([`super::Admitting`]); the driver runs the
//!    guest only once it is done (a QEMU guest that boots runs from QEMU's
//!    start, so that boot waits for it first): rtnetlink claims a slot by
//!    adding its route (the kernel is the allocator, host-wide: see
//!    [`Fence::claim_slot`]), `conntrack` deletes what a VM that held the
//!    slot before left in its zone (its connections outlive it), one `nft`
//!    transaction adds the tap's mark and zone, rtnetlink adds the slot's
//!    rule if it is missing. [`Fence::assign`] names the app in the mark
//!    when a runtime clone becomes an app's. The returned [`FenceSlot`]
//!    deletes the mark and zone when dropped; the route goes with the tap,
//!    which frees the slot.
//! 4. [`Fence::down`] at stop deletes the table and the rules of slots no
//!    tap holds.
//!
//! `nft` (Debian's `nftables`) applies the rules: each transaction is
//! atomic, and the rules read as an operator would write them. `conntrack`
//! (Debian's `conntrack`) deletes a zone's entries.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::rule::{RuleAction, RuleAttribute};
use serde::{Deserialize, Serialize};

use super::{NetError, Network};

/// The top byte of every mark the fence sets.
const MARK_TAG: u32 = 0x53 << 24;
/// Priority of the fence's policy-routing rules (before `main`, 32766).
const RULE_PRIORITY: u32 = 10_000;
/// The bits of a mark a routing rule matches: the tag and the slot.
const SLOT_MASK: u32 = 0xff00_0fff;
/// Routing table of slot `n`: `TABLE_BASE + n`.
const TABLE_BASE: u32 = 0x5347_0000;

/// One destination an app's VMs may open connections to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Egress {
    /// The IPv4 network (`203.0.113.0/24`, or one address as `/32`).
    pub to: Ipv4Net,
    /// TCP and UDP destination ports; empty: every port.
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// The gateway's fence (see the module doc).
pub struct Fence {
    net: Network,
    table: String,
    state: Arc<Mutex<State>>,
    /// Set once the table is deleted.
    down: std::sync::atomic::AtomicBool,
}

impl Drop for Fence {
    /// A fence dropped without [`Fence::down`] (a start-up that failed, a
    /// gateway dropped without a shutdown) still deletes its table.
    fn drop(&mut self) {
        if !self.down.load(std::sync::atomic::Ordering::SeqCst) {
            self.down_now();
        }
    }
}

impl State {
    /// `app`'s number (given now if it has none) and whether it has egress.
    fn app(&mut self, app: &str) -> (u32, bool) {
        let next = self.apps.len() as u32 + 1;
        let number = *self.apps.entry(app.to_owned()).or_insert(next);
        // Numbers past 12 bits name no app in the allow rules.
        let number = if number > 0xfff { 0 } else { number };
        (number, self.with_egress.contains(app))
    }
}

#[derive(Default)]
struct State {
    /// App -> its number in the marks (1..=4095), never reused while the
    /// gateway runs.
    apps: HashMap<String, u32>,
    /// Apps whose egress is not empty.
    with_egress: BTreeSet<String>,
    /// Where the next slot search starts (1..=4095).
    next: u32,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence").field("table", &self.table).finish()
    }
}

impl Fence {
    /// Writes this gateway's table (protocol step 1) with the egress of
    /// `apps`. Fails, naming what is missing, when `nft` cannot run or the
    /// kernel refuses the rules.
    pub async fn up(
        net: &Network,
        apps: &BTreeMap<String, Vec<Egress>>,
    ) -> Result<Arc<Fence>, NetError> {
        let table = format!("snapgate_{}", net.params().tap_prefix);
        let fence = Fence {
            net: net.clone(),
            table,
            state: Arc::default(),
            down: Default::default(),
        };
        refuse_overlap(&net.params().tap_prefix).await?;
        // Every admission runs conntrack (flush_zone): missing, start-up
        // says so rather than the first cold start.
        conntrack(&["--version"]).await?;
        let egress = fence.egress_rules(apps)?;
        let script = table_script(&fence.table, net.params(), &egress);
        nft(&script).await?;
        // The host's own replies to a guest (the fence's rejects) carry the
        // mark of the packet they answer, so they route back to its tap
        // (ip-sysctl: fwmark_reflect; it changes nothing for unmarked
        // packets).
        super::set_sysctl("/proc/sys/net/ipv4/fwmark_reflect", "1")?;
        fence.remove_stale_rules().await?;
        Ok(Arc::new(fence))
    }

    /// The nftables table's name (`snapgate_<tap_prefix>`, family `inet`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Rewrites the allow rules for `apps` (protocol step 2).
    pub async fn set_egress(&self, apps: &BTreeMap<String, Vec<Egress>>) -> Result<(), NetError> {
        let rules = self.egress_rules(apps)?;
        let mut script = format!("flush chain inet {} egress\n", self.table);
        for rule in rules {
            script.push_str(&format!("add rule inet {} egress {rule}\n", self.table));
        }
        nft(&script).await
    }

    /// Gives the VM on `tap` (interface `index`, [`super::Tap::index`]) its
    /// slot (protocol step 3): its mark (naming
    /// `app`, if the VM is already an app's), its conntrack zone, and the
    /// route back to it; and, when `app` has egress, forwarding on the tap.
    pub async fn admit(
        &self,
        tap: &str,
        index: u32,
        app: Option<&str>,
    ) -> Result<FenceSlot, NetError> {
        let (number, egress) = match app {
            Some(app) => self.lock().app(app),
            None => (0, false),
        };
        let slot = self.claim_slot(tap, index).await?;
        // From here the slot is the guard's: dropped on an error, it undoes
        // what was done.
        let guard = FenceSlot {
            tap: tap.to_owned(),
            slot,
            mark: MARK_TAG | number << 12 | slot,
            undo: Some(Undo {
                table: self.table.clone(),
                tap: tap.to_owned(),
            }),
        };
        let script = format!(
            "add element inet {t} marks {{ \"{tap}\" : {mark:#x} }}\n\
             add element inet {t} zones {{ \"{tap}\" : {slot} }}\n",
            t = self.table,
            mark = guard.mark,
        );
        // Before the tap's traffic is put in the zone: what a VM that held
        // the slot before left there (its egress connections, which live
        // on after it) is not this VM's to continue or to be sent.
        flush_zone(slot).await?;
        nft(&script).await?;
        self.add_rule(tap, slot).await?;
        if egress {
            self.allow_forwarding(tap)?;
        }
        Ok(guard)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the VM of `slot` `app`'s (a runtime clone that an app starts
    /// in): its mark now names the app, and its tap forwards if the app has
    /// egress.
    pub async fn assign(&self, slot: &mut FenceSlot, app: &str) -> Result<(), NetError> {
        let (number, egress) = self.lock().app(app);
        let mark = MARK_TAG | number << 12 | slot.slot;
        let script = format!(
            "delete element inet {t} marks {{ \"{tap}\" }}\n\
             add element inet {t} marks {{ \"{tap}\" : {mark:#x} }}\n",
            t = self.table,
            tap = slot.tap,
        );
        nft(&script).await?;
        slot.mark = mark;
        if egress {
            self.allow_forwarding(&slot.tap)?;
        }
        Ok(())
    }

    /// IPv4 forwarding is decided by the interface a packet comes in on:
    /// `tap`'s traffic may be forwarded, and the fence decides where to.
    fn allow_forwarding(&self, tap: &str) -> Result<(), NetError> {
        super::set_sysctl(&format!("/proc/sys/net/ipv4/conf/{tap}/forwarding"), "1")
    }

    /// Deletes the table and the fence's routing rules (protocol step 4).
    pub async fn down(&self) -> Result<(), NetError> {
        let script = format!("table inet {0}\ndelete table inet {0}\n", self.table);
        nft(&script).await?;
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        // Rules are shared by slot with other gateways on the host: only
        // those no live tap uses go.
        self.remove_stale_rules().await
    }

    /// [`Fence::down`] for a caller that cannot wait (a drop): deletes the
    /// table with a blocking `nft` run; the routing rules stay until the
    /// next start removes them.
    fn down_now(&self) {
        use std::io::Write;
        let script = format!("table inet {0}\ndelete table inet {0}\n", self.table);
        let child = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if let Ok(mut child) = child {
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(script.as_bytes());
            }
            let _ = child.wait();
        }
    }

    fn egress_rules(&self, apps: &BTreeMap<String, Vec<Egress>>) -> Result<Vec<String>, NetError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut rules = Vec::new();
        state.with_egress.clear();
        for (app, egress) in apps.iter().filter(|(_, e)| !e.is_empty()) {
            let (number, _) = state.app(app);
            if number == 0 {
                return Err(NetError::Fence {
                    problem: format!("apps.{app}.egress: more than 4095 apps have had a number"),
                });
            }
            state.with_egress.insert(app.clone());
            let mark = MARK_TAG | number << 12;
            for e in egress {
                let ports = if e.ports.is_empty() {
                    String::new()
                } else {
                    let list: Vec<String> = e.ports.iter().map(u16::to_string).collect();
                    format!(
                        " meta l4proto {{ tcp, udp }} th dport {{ {} }}",
                        list.join(", ")
                    )
                };
                rules.push(format!(
                    "meta mark & 0xfffff000 == {mark:#x} ip daddr {}{ports} counter accept \
                     comment \"egress of {}\"",
                    e.to,
                    app.escape_default()
                ));
            }
        }
        Ok(rules)
    }
}

/// The whole table `t` for the taps of `params`, with `egress`'s allow
/// rules (protocol step 1).
fn table_script(t: &str, params: &super::NetParams, egress: &[String]) -> String {
    {
        let taps = format!("\"{}*\"", params.tap_prefix);
        let mut egress_chain = String::new();
        for rule in egress {
            egress_chain.push_str(&format!("    {rule}\n"));
        }
        let host = params.host_ip;
        format!(
            "table inet {t}\n\
             delete table inet {t}\n\
             table inet {t} {{\n\
             \x20 map marks {{ typeof iifname : meta mark; }}\n\
             \x20 map zones {{ typeof iifname : ct zone; }}\n\
             \x20 chain raw {{\n\
             \x20   type filter hook prerouting priority raw; policy accept;\n\
             \x20   iifname {taps} ip daddr {host} notrack\n\
             \x20   iifname {taps} ip daddr != {host} ct original zone set iifname map @zones\n\
             \x20 }}\n\
             \x20 chain raw_out {{\n\
             \x20   type filter hook output priority raw; policy accept;\n\
             \x20   oifname {taps} notrack\n\
             \x20 }}\n\
             \x20 chain mangle {{\n\
             \x20   type filter hook prerouting priority mangle; policy accept;\n\
             \x20   iifname {taps} meta mark set iifname map @marks\n\
             \x20   iifname {taps} ct state new ct mark set meta mark\n\
             \x20   ct direction reply ct mark & 0xff000000 == {MARK_TAG:#x} meta mark set ct mark\n\
             \x20 }}\n\
             \x20 chain input {{\n\
             \x20   type filter hook input priority filter - 5; policy accept;\n\
             \x20   iifname {taps} meta l4proto tcp tcp flags & (syn | ack) != syn accept\n\
             \x20   iifname {taps} counter reject with icmpx type admin-prohibited comment \"to the host\"\n\
             \x20 }}\n\
             \x20 chain forward {{\n\
             \x20   type filter hook forward priority filter - 5; policy accept;\n\
             \x20   iifname {taps} oifname {taps} counter reject with icmpx type admin-prohibited comment \"tap to tap\"\n\
             \x20   oifname {taps} ct state established,related accept\n\
             \x20   oifname {taps} counter drop comment \"into a tap\"\n\
             \x20   iifname {taps} ct state established,related accept\n\
             \x20   iifname {taps} jump egress\n\
             \x20   iifname {taps} counter reject with icmpx type admin-prohibited comment \"egress not allowed\"\n\
             \x20 }}\n\
             \x20 chain egress {{\n\
             {egress_chain}\
             \x20 }}\n\
             \x20 chain postrouting {{\n\
             \x20   type nat hook postrouting priority srcnat; policy accept;\n\
             \x20   iifname {taps} oifname != {taps} masquerade\n\
             \x20 }}\n\
             }}\n"
        )
    }
}

impl Fence {
    /// Claims a slot for `tap`: the first free one whose table takes the
    /// route of the guest's address through `tap`. The route is the claim,
    /// host-wide (every gateway on the host draws from the same 4095
    /// slots and the same conntrack zones): adding it fails with `EEXIST`
    /// while another tap holds the slot, and the kernel removes it with its
    /// tap, which frees the slot.
    async fn claim_slot(&self, tap: &str, index: u32) -> Result<u32, NetError> {
        let guest: Ipv4Addr = self.net.params().guest_ip;
        let start = {
            let mut state = self.lock();
            state.next = state.next % 0xfff + 1;
            state.next
        };
        for n in 0..0xfff {
            let slot = (start - 1 + n) % 0xfff + 1;
            let added = self
                .net
                .handle
                .route()
                .add()
                .v4()
                .destination_prefix(guest, 32)
                .output_interface(index)
                .table_id(TABLE_BASE + slot)
                .execute()
                .await;
            match added {
                Ok(()) => return Ok(slot),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -nix::libc::EEXIST => {}
                Err(source) => {
                    return Err(NetError::Link {
                        what: "add the route back to the guest",
                        name: tap.to_owned(),
                        source,
                    })
                }
            }
        }
        Err(NetError::Fence {
            problem: "all 4095 slots are held by live VMs on this host".into(),
        })
    }

    /// Rule `fwmark <tag|slot>/<tag and slot bits> lookup <slot's table>`;
    /// one per slot, shared by whichever tap holds the slot.
    async fn add_rule(&self, tap: &str, slot: u32) -> Result<(), NetError> {
        let mut rule = self
            .net
            .handle
            .rule()
            .add()
            .v4()
            .fw_mark(MARK_TAG | slot)
            .table_id(TABLE_BASE + slot)
            .priority(RULE_PRIORITY)
            .action(RuleAction::ToTable);
        rule.message_mut()
            .attributes
            .push(RuleAttribute::FwMask(SLOT_MASK));
        match rule.execute().await {
            Ok(()) => Ok(()),
            // Left by an earlier VM in the same slot: it leads to the same
            // table, whose route is now this tap's.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -nix::libc::EEXIST => Ok(()),
            Err(source) => Err(NetError::Link {
                what: "add the routing rule",
                name: tap.to_owned(),
                source,
            }),
        }
    }

    /// The fence's routing rules: priority [`RULE_PRIORITY`], a mark of
    /// [`MARK_TAG`].
    async fn our_rules(&self) -> Result<Vec<netlink_packet_route::rule::RuleMessage>, NetError> {
        let mut rules = self
            .net
            .handle
            .rule()
            .get(rtnetlink::IpVersion::V4)
            .execute();
        let mut ours = Vec::new();
        let err = |source| NetError::Link {
            what: "list routing rules",
            name: self.table.clone(),
            source,
        };
        while let Some(rule) = rules.try_next().await.map_err(err)? {
            let priority = rule
                .attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Priority(p) if *p == RULE_PRIORITY));
            let marked = rule
                .attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::FwMark(m) if m & 0xff00_0000 == MARK_TAG));
            if priority && marked {
                ours.push(rule);
            }
        }
        Ok(ours)
    }

    /// Deletes the routing rules whose table has no route left: their tap
    /// is gone (a run that died, or a VM that stopped).
    async fn remove_stale_rules(&self) -> Result<(), NetError> {
        let rules = self.our_rules().await?;
        if rules.is_empty() {
            return Ok(());
        }
        let mut used = BTreeSet::new();
        let mut routes = self
            .net
            .handle
            .route()
            .get(rtnetlink::IpVersion::V4)
            .execute();
        while let Ok(Some(route)) = routes.try_next().await {
            for a in &route.attributes {
                if let netlink_packet_route::route::RouteAttribute::Table(t) = a {
                    used.insert(*t);
                }
            }
        }
        for rule in rules {
            let table = rule.attributes.iter().find_map(|a| match a {
                RuleAttribute::Table(t) => Some(*t),
                _ => None,
            });
            if table.is_some_and(|t| !used.contains(&t)) {
                let _ = self.net.handle.rule().del(rule).execute().await;
            }
        }
        Ok(())
    }
}

/// A tap's slot (protocol step 3). Dropping it removes the tap's mark and
/// zone (in a task of its own: `nft` runs as a process) and frees the
/// slot. The slot's routing rule stays for the next tap in the slot; its
/// route went with the tap.
pub struct FenceSlot {
    tap: String,
    slot: u32,
    mark: u32,
    undo: Option<Undo>,
}

impl FenceSlot {
    /// The packet mark of the tap's traffic.
    pub fn mark(&self) -> u32 {
        self.mark
    }
}

struct Undo {
    table: String,
    tap: String,
}

impl std::fmt::Debug for FenceSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FenceSlot")
            .field("tap", &self.tap)
            .field("slot", &self.slot)
            .field("mark", &format_args!("{:#x}", self.mark))
            .finish()
    }
}

impl Drop for FenceSlot {
    fn drop(&mut self) {
        let Some(undo) = self.undo.take() else { return };
        let script = remove_elements(&undo.table, &undo.tap);
        // The slot itself is freed by the kernel: its route goes with the
        // tap.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // A tap whose elements were never added: nothing to delete.
            runtime.spawn(async move { nft(&script).await });
        }
        // No runtime: the elements stay until the table is rewritten at
        // the next start; the tap name is never reused meanwhile.
    }
}

fn remove_elements(table: &str, tap: &str) -> String {
    format!(
        "delete element inet {table} marks {{ \"{tap}\" }}\n\
         delete element inet {table} zones {{ \"{tap}\" }}\n"
    )
}

/// Fails if another gateway's fence on this host covers taps of `prefix`'s
/// or the other way round: rules match taps by prefix (`iifname
/// "<prefix>*"`), so of `sg` and `sgtap` one would fence the other's taps.
async fn refuse_overlap(prefix: &str) -> Result<(), NetError> {
    let out = tokio::process::Command::new("nft")
        .args(["list", "tables", "inet"])
        .output()
        .await
        .map_err(|e| NetError::Fence {
            problem: format!("cannot run nft ({e}); install nftables or set network.fence: false"),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    for other in text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table inet snapgate_"))
    {
        if other != prefix && (other.starts_with(prefix) || prefix.starts_with(other)) {
            return Err(NetError::Fence {
                problem: format!(
                    "tap_prefix {prefix:?} overlaps {other:?}, whose fence (table inet \
                     snapgate_{other}) is on this host: each would fence the other's taps; \
                     choose prefixes that do not start one another (or, if no gateway \
                     uses it any more, `nft delete table inet snapgate_{other}`)"
                ),
            });
        }
    }
    Ok(())
}

/// Runs `nft -f -` with `script`; its error output names what failed.
/// Deletes the conntrack entries whose original direction is in `zone`
/// (`conntrack -D --orig-zone`, Debian's `conntrack`): the connections a
/// VM that held the slot before opened. Their replies would otherwise be
/// routed to the slot's new tap (their mark names the slot), and the new
/// guest could continue them. `conntrack` exits 1 when nothing matched.
///
/// Hand-run rather than through a netlink crate: no well-kept Rust crate
/// speaks ctnetlink's delete, and the fence already runs `nft` the same
/// way.
async fn flush_zone(zone: u32) -> Result<(), NetError> {
    let out = conntrack(&["-D", "--orig-zone", &zone.to_string()]).await?;
    let said = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || said.contains(" 0 flow entries have been deleted") {
        Ok(())
    } else {
        Err(NetError::Fence {
            problem: format!(
                "conntrack -D --orig-zone {zone} (the entries a slot's last VM left): {}",
                said.trim()
            ),
        })
    }
}

/// Runs `conntrack` with `args`; an error only if it cannot be run.
async fn conntrack(args: &[&str]) -> Result<std::process::Output, NetError> {
    tokio::process::Command::new("conntrack")
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| NetError::Fence {
            problem: format!(
                "cannot run conntrack ({e}); install conntrack or set network.fence: false"
            ),
        })
}

async fn nft(script: &str) -> Result<(), NetError> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| NetError::Fence {
            problem: format!("cannot run nft ({e}); install nftables or set network.fence: false"),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| NetError::Fence {
                problem: format!("writing to nft: {e}"),
            })?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| NetError::Fence {
            problem: format!("waiting for nft: {e}"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Fence {
            problem: format!(
                "nft refused the rules ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The connections in conntrack zone `zone`, as `conntrack -L` lists
    /// them.
    fn zone_entries(zone: u32) -> usize {
        let out = std::process::Command::new("conntrack")
            .args(["-L", "--orig-zone", &zone.to_string()])
            .output()
            .expect("conntrack (Debian package conntrack)");
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    /// An established TCP connection in `zone`, as a guest's egress
    /// leaves one.
    fn insert_entry(zone: u32, sport: u16) {
        let out = std::process::Command::new("conntrack")
            .args(["-I", "-p", "tcp", "-s", "10.0.0.2", "-d", "10.213.9.9"])
            .args(["--sport", &sport.to_string(), "--dport", "80"])
            .args(["--state", "ESTABLISHED", "-t", "300", "-u", "ASSURED"])
            .args(["--orig-zone", &zone.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A VM that gets a slot another VM held finds its zone empty: the
    /// connection the last one left is gone, another zone's is not.
    #[tokio::test]
    async fn a_reused_slot_starts_with_an_empty_conntrack_zone() {
        use super::super::{NetParams, Network};
        // Slots far above those of the host's other gateways (each starts
        // its search at 1).
        const SLOT: u32 = 4000;
        let net = Network::new(NetParams {
            tap_prefix: "sgcz".into(),
            ..NetParams::default()
        })
        .unwrap();
        let fence = Fence::up(&net, &BTreeMap::new()).await.unwrap();
        // Whatever happens below: the table and the two zones' entries go.
        struct Cleanup;
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let run = |args: &[&str]| {
                    std::process::Command::new(args[0])
                        .args(&args[1..])
                        .output()
                };
                let _ = run(&["nft", "delete", "table", "inet", "snapgate_sgcz"]);
                for zone in [SLOT, SLOT + 1] {
                    let _ = run(&["conntrack", "-D", "--orig-zone", &zone.to_string()]);
                }
            }
        }
        let _cleanup = Cleanup;
        let sport = 40000 + (std::process::id() % 20000) as u16;
        let _ = flush_zone(SLOT).await;
        let _ = flush_zone(SLOT + 1).await;
        fence.lock().next = SLOT - 1;
        let first = net.create_tap().await.unwrap();
        let held = fence
            .admit(first.name(), first.index(), None)
            .await
            .unwrap();
        assert_eq!(held.slot, SLOT);
        insert_entry(SLOT, sport);
        insert_entry(SLOT + 1, sport + 1);
        assert_eq!(zone_entries(SLOT), 1);
        // The VM goes: its tap, and with it the route that held the slot.
        let gone = format!("/sys/class/net/{}", first.name());
        drop(held);
        drop(first);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::path::Path::new(&gone).exists() {
            assert!(std::time::Instant::now() < deadline, "{gone} stays");
            tokio::task::yield_now().await;
        }
        fence.lock().next = SLOT - 1;
        let second = net.create_tap().await.unwrap();
        let slot = fence
            .admit(second.name(), second.index(), None)
            .await
            .unwrap();
        assert_eq!(slot.slot, SLOT);
        assert_eq!(zone_entries(SLOT), 0, "the last VM's connection is gone");
        assert_eq!(zone_entries(SLOT + 1), 1, "another zone keeps its own");
        drop(slot);
        drop(second);
        fence.down().await.unwrap();
    }

    /// The kernel's nftables, through `nft --check`, takes the table as
    /// written, with an app's egress rules.
    #[test]
    fn the_table_is_valid_nftables() {
        let params = super::super::NetParams::default();
        let rule = "meta mark & 0xfffff000 == 0x53001000 ip daddr 203.0.113.0/24 \
                    meta l4proto { tcp, udp } th dport { 443 } counter accept comment \"egress of a\"";
        let script = table_script("snapgate_unitcheck", &params, &[rule.to_owned()]);
        let mut child = std::process::Command::new("nft")
            .args(["--check", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("nft (Debian package nftables)");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
