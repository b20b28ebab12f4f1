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
//!   kernel's generator and makes it reseed at once (on Linux: write them
//!   to `/dev/urandom`, then the `RNDRESEEDCRNG` ioctl).
//!
//! It travels as the body of a POST: to a VM app's `on_restore` path
//! ([`OnRestore`], this module's [`on_restore`]), or to the guest agent of
//! a runtime image (its `/resumed`, or inside its start message). The test
//! guest and the agent apply it in `guest/init/src/resume.rs`.

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
        getrandom::fill(&mut entropy).map_err(|e| VmmError::Io {
            what: "cannot draw fresh entropy from",
            path: "getrandom(2)".into(),
            source: std::io::Error::from(e),
        })?;
        Ok(Resumed {
            now_ms: now_ms(),
            entropy,
        })
    }

    /// The message as JSON (module doc).
    pub fn to_json(&self) -> serde_json::Value {
        let hex: String = self.entropy.iter().map(|b| format!("{b:02x}")).collect();
        serde_json::json!({ "now_ms": self.now_ms, "entropy": hex })
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
/// (module doc) there once per clone, as soon as the restored clone accepts
/// a connection, before its readiness probe and before it takes any
/// request. The guest must answer 200 within `timeout`; any other answer,
/// or none, fails that clone's start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnRestore {
    /// The path, e.g. `/snapgate/resumed`.
    pub path: String,
    /// How long the guest may take to answer (default 5s).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl OnRestore {
    /// Problems with the settings, as (field, message).
    pub fn validate(&self) -> Vec<crate::FieldError> {
        let mut out = Vec::new();
        if !self.path.starts_with('/') {
            out.push(crate::FieldError::new(
                "on_restore.path",
                format!("{:?} must start with /", self.path),
            ));
        }
        if self.timeout.is_zero() {
            out.push(crate::FieldError::new(
                "on_restore.timeout",
                "must be above zero",
            ));
        }
        out
    }
}

/// POSTs a fresh resumed message to `path` on port `port` of `vm`: connects
/// (trying again while the guest's network comes back after the restore;
/// nothing is sent twice), makes the message (so its time is as late as
/// can be), sends it and waits for a 200, all within `timeout`; fails at
/// once if the VMM exits or the guest stops ([`watch::guarded`]). Records
/// `step`.
pub async fn post(
    vmm: &dyn Vmm,
    vm: &mut Vm,
    port: u16,
    path: &str,
    timeout: Duration,
    step: &'static str,
) -> Result<(), VmmError> {
    let started = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut target = vm.endpoint().clone();
    target.addr.set_port(port);
    let call = async {
        let stream = ready::connect_until(&target, deadline.into_std()).await?;
        let body = Resumed::fresh().map_err(|e| e.to_string())?.body();
        let answer = ready::request_on(stream, &target, http::Method::POST, path, body);
        tokio::time::timeout_at(deadline, answer)
            .await
            .map_err(|_| format!("no answer within {:.1}s", timeout.as_secs_f64()))?
    };
    let problem = match watch::guarded(vmm, vm, step, call).await? {
        Ok((200, _)) => {
            vm.record(step, started.elapsed());
            return Ok(());
        }
        Ok((status, text)) => format!(
            "answered HTTP {status}: {}",
            String::from_utf8_lossy(&text).trim()
        ),
        Err(e) => e,
    };
    Err(VmmError::Resume {
        vm: vm.id().clone(),
        call: format!("POST {path} on {target}", target = target.addr),
        problem,
    })
}

/// Runs the VM app's [`OnRestore`] hook on a restored clone (module doc).
/// Records `on_restore`.
pub async fn on_restore(vmm: &dyn Vmm, vm: &mut Vm, hook: &OnRestore) -> Result<(), VmmError> {
    let port = vm.endpoint().addr.port();
    post(vmm, vm, port, &hook.path, hook.timeout, "on_restore").await
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
        assert!(hook.validate().is_empty());
        let bad: OnRestore = serde_yaml_ng::from_str("path: r\ntimeout: 0s\n").unwrap();
        let fields: Vec<String> = bad.validate().into_iter().map(|p| p.field).collect();
        assert_eq!(fields, ["on_restore.path", "on_restore.timeout"]);
        assert!(serde_yaml_ng::from_str::<OnRestore>("path: /r\nretries: 3\n").is_err());
    }
}
