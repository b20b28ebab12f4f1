//! The resumed message: what makes each clone its own.
//!
//! A snapshot freezes the guest kernel's random generator, every generator
//! in the guest's processes, and the clock; every clone of it resumes with
//! all of them as they were. Before a clone takes its first request,
//! snapgate sends it one message, a JSON object:
//!
//! ```json
//! {"now_ms": 1764500000123, "entropy": "<64 hex digits>"}
//! ```
//!
//! - `now_ms`: the host's clock when the message was made, milliseconds
//!   since the Unix epoch; the guest sets its clock to it.
//! - `entropy`: 32 bytes the host drew from its own kernel (`getrandom(2)`)
//!   for this clone alone, hex-encoded; the guest mixes them into its
//!   kernel's generator and makes it reseed at once (on Linux: the
//!   `RNDADDENTROPY` ioctl, credited, then `RNDRESEEDCRNG`).
//!
//! It travels as the body of a POST to a [`Hook`] of the guest ([`send`]):
//! a VM app's `on_restore` path ([`OnRestore`]), or a path its caller
//! names, such as the `/resumed` of a runtime image's guest agent. The
//! test guest and the agent apply it in `guest/init/src/resume.rs`.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{ready, watch, Vm, Vmm, VmmError};

/// Bytes of fresh entropy per message.
pub const ENTROPY_BYTES: usize = 32;

/// One resumed message (module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resumed {
    /// The host's clock, ms since the Unix epoch.
    pub now_ms: u64,
    /// Fresh host entropy for one clone.
    pub entropy: [u8; ENTROPY_BYTES],
}

impl Resumed {
    /// A message for one clone: the host's time now and 32 bytes from the
    /// host's `getrandom(2)`. Make it right before sending it.
    pub fn fresh() -> Result<Resumed, VmmError> {
        let mut entropy = [0u8; ENTROPY_BYTES];
        getrandom::fill(&mut entropy).map_err(|e| VmmError::Entropy {
            source: std::io::Error::from(e),
        })?;
        Ok(Resumed {
            now_ms: now_ms(),
            entropy,
        })
    }

    /// The message as JSON (module doc).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "now_ms": self.now_ms, "entropy": hex::encode(self.entropy) })
    }

    /// The message as a request body.
    pub fn body(&self) -> Bytes {
        Bytes::from(self.to_json().to_string())
    }
}

/// The host's clock, ms since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

/// A VM app's own resume hook (`image.on_restore` in `proxy.yaml`): a path
/// the guest serves on its `guest_port`. snapgate POSTs the resumed message
/// (module doc) there once per clone, as soon as the clone answers its
/// readiness probe, before it takes any request. The guest must answer 200
/// within `timeout`; any other answer, or none, fails that clone's start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnRestore {
    /// The path, e.g. `/snapgate/resumed`.
    pub path: String,
    /// How long the guest may take to take the connection and answer
    /// (default 5s).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl OnRestore {
    /// Problems with the settings of a hook on a guest whose readiness path
    /// is `ready_path`, as (field, message): the path must be an absolute
    /// path that fits an HTTP request line (RFC 9112 section 3.2: no
    /// spaces, controls or fragment) and differ from `ready_path` (a guest
    /// that answers its probe for any method would take the message and
    /// apply nothing). The layer that routes clients' requests adds its own
    /// rules.
    pub fn validate(&self, ready_path: &str) -> Vec<crate::FieldError> {
        let mut out = Vec::new();
        let fits = self.path.starts_with('/')
            && self.path.bytes().all(|b| b.is_ascii_graphic() && b != b'#');
        if !fits {
            out.push(crate::FieldError::new(
                "on_restore.path",
                format!(
                    "{:?} must start with / and hold only printable ASCII, no #",
                    self.path
                ),
            ));
        } else if self.path == ready_path {
            out.push(crate::FieldError::new(
                "on_restore.path",
                format!(
                    "{:?} is also ready_path: give the hook a path of its own",
                    self.path
                ),
            ));
        }
        if self.timeout < Duration::from_millis(1) {
            out.push(crate::FieldError::new(
                "on_restore.timeout",
                "must be at least 1ms",
            ));
        }
        out
    }

    /// The hook on a guest serving on `guest_port`, whose readiness probe
    /// is `GET ready_path` there.
    pub fn hook(&self, guest_port: u16, ready_path: &str) -> Hook {
        Hook {
            port: guest_port,
            ready_path: ready_path.to_owned(),
            path: self.path.clone(),
            timeout: self.timeout,
        }
    }
}

/// Where a clone takes its resumed message: `POST path` on `port` of the
/// guest's address, once `GET ready_path` there answers 200, answered
/// within `timeout`.
///
/// The message waits for that probe because the probe brings the clone's
/// network up, and, under software emulation (TCG), has the guest
/// translate the code that answers requests (a clone starts with none):
/// sent before it, the message would wait in the guest long enough, on a
/// busy host, for the clock it carries to be a second late when set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    /// The guest's port.
    pub port: u16,
    /// The readiness path on that port, answered before the message goes.
    pub ready_path: String,
    /// The path the message is POSTed to.
    pub path: String,
    /// How long the guest may take to answer the message.
    pub timeout: Duration,
}

/// What [`send`] is doing, as a watched wait names it.
const DURING: &str = "taking its resumed message";

/// Sends `vm`, a guest that answered `hook.ready_path`, a fresh resumed
/// message at `hook` (made right before: the guest's network is up and
/// answers in milliseconds) and waits for a 200, all within `hook.timeout`;
/// fails at once if the VMM exits or the guest stops ([`watch::guarded`]).
/// Records `resumed`.
///
/// Errors: [`VmmError::Resume`] naming the call and what went wrong (an
/// answer other than 200, none in time, a broken connection), or
/// [`VmmError::Exited`] when a broken call turns out to be a VMM that
/// exited; [`VmmError::Entropy`] when the host cannot draw the bytes.
pub async fn send(vmm: &dyn Vmm, vm: &mut Vm, hook: &Hook) -> Result<(), VmmError> {
    let started = std::time::Instant::now();
    let mut target = vm.endpoint().clone();
    target.addr.set_port(hook.port);
    let body = Resumed::fresh()?.body();
    let call = tokio::time::timeout(
        hook.timeout,
        ready::request(&target, http::Method::POST, &hook.path, body),
    );
    let (problem, broken) = match watch::guarded(vmm, vm, DURING, call).await? {
        Ok(Ok((200, _))) => {
            vm.record("resumed", started.elapsed());
            return Ok(());
        }
        Ok(Ok((status, text))) => (
            format!(
                "answered HTTP {status}: {}",
                String::from_utf8_lossy(&text).trim()
            ),
            false,
        ),
        Ok(Err(e)) => (e.to_string(), true),
        Err(_) => (
            format!("no answer within {:.1}s", hook.timeout.as_secs_f64()),
            true,
        ),
    };
    let err = VmmError::Resume {
        vm: vm.id().clone(),
        call: format!("POST {} on {}", hook.path, target.addr),
        problem,
    };
    if broken {
        // A broken or silent call is often a VMM on its way out.
        return Err(vm.process_mut().explain(err, DURING).await);
    }
    Err(err)
}

/// Brings a restored clone to serve, made its own ([`Hook`]): with a hook,
/// its readiness on the hook's port, then the message, then (when the hook
/// is another service's, such as a runtime's agent) the guest's own
/// readiness; without one, its readiness alone. `ready_timeout` bounds
/// each readiness wait.
pub async fn ready_and_resumed(
    vmm: &dyn Vmm,
    vm: &mut Vm,
    hook: Option<&Hook>,
    ready_timeout: Duration,
) -> Result<(), VmmError> {
    let Some(hook) = hook else {
        return ready::wait_ready(vmm, vm, ready_timeout).await;
    };
    ready::wait_ready_at(vmm, vm, hook.port, &hook.ready_path, ready_timeout).await?;
    send(vmm, vm, hook).await?;
    let own = (vm.endpoint().addr.port(), vm.ready_path());
    if own != (hook.port, hook.ready_path.as_str()) {
        ready::wait_ready(vmm, vm, ready_timeout).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_message_has_its_own_entropy_and_the_host_time() {
        let a = Resumed::fresh().unwrap();
        let b = Resumed::fresh().unwrap();
        assert_ne!(a.entropy, b.entropy);
        assert!(now_ms().abs_diff(a.now_ms) < 1000);
        let json = a.to_json();
        let hex = json["entropy"].as_str().unwrap();
        assert_eq!(hex.len(), 2 * ENTROPY_BYTES);
        assert!(hex.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(json["now_ms"], a.now_ms);
    }

    #[test]
    fn on_restore_settings_are_checked() {
        let hook: OnRestore = serde_yaml_ng::from_str("path: /r\n").unwrap();
        assert_eq!(hook.timeout, Duration::from_secs(5));
        assert!(hook.validate("/healthz").is_empty());
        assert_eq!(hook.hook(8080, "/healthz").port, 8080);
        let bad: OnRestore = serde_yaml_ng::from_str("path: r\ntimeout: 0s\n").unwrap();
        let fields: Vec<String> = bad
            .validate("/healthz")
            .into_iter()
            .map(|p| p.field)
            .collect();
        assert_eq!(fields, ["on_restore.path", "on_restore.timeout"]);
        for path in ["/a b", "/a\r\nX-Evil: y", "/\u{e9}", "/a#x", "r"] {
            let hook = OnRestore {
                path: path.into(),
                timeout: Duration::from_secs(1),
            };
            assert_eq!(hook.validate("/healthz").len(), 1, "{path:?}");
        }
        let same = OnRestore {
            path: "/healthz".into(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(same.validate("/healthz").len(), 1);
        assert!(same.validate("/ready").is_empty());
        assert!(serde_yaml_ng::from_str::<OnRestore>("path: /r\nretries: 3\n").is_err());
    }
}
