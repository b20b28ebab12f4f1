//! Per-app snapshots of runtime apps (module doc, last section): the
//! template boots the runtime image with the app's code as its extra disk,
//! starts the app, and freezes the runtime before the snapshot.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{freeze, start_app, StartSpec};
use crate::config::RuntimeConfig;
use crate::snapshot::{Prepare, PrepareError};
use crate::vmm::spec::DiskSpec;
use crate::vmm::{ImageSpec, Vm, Vmm};

/// The template step of a per-app snapshot (module doc, last section).
pub struct AppTemplate {
    /// How the app starts.
    pub start: StartSpec,
}

/// The image a per-app snapshot's template boots: the runtime's image with
/// the app's code image as its code disk.
pub fn app_image(runtime: &RuntimeConfig, code: &Path) -> ImageSpec {
    let mut spec = runtime.image.clone();
    spec.extra_disk_mib = None;
    spec.disks.push(DiskSpec {
        path: PathBuf::from(code),
    });
    spec
}

#[async_trait]
impl Prepare for AppTemplate {
    async fn prepare(&self, vmm: &dyn Vmm, vm: &mut Vm) -> Result<(), PrepareError> {
        // The agent's port, before the VM serves the app's.
        let agent_port = vm.endpoint().addr.port();
        start_app(vmm, vm, None, &self.start).await?;
        vm.set_prepared(self.start.message());
        Ok(freeze(vmm, vm, agent_port).await?)
    }

    fn prepared_spec(&self, boot: &ImageSpec) -> ImageSpec {
        let mut spec = boot.clone();
        spec.guest_port = self.start.port;
        spec.ready_path = self.start.ready_path.clone();
        spec.ready_timeout = self.start.ready_timeout;
        spec.prepared = Some(self.start.message());
        spec
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn start(env: &[(&str, &str)]) -> StartSpec {
        StartSpec {
            app: "a".into(),
            main: "server.js".into(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            port: 8080,
            ready_path: "/healthz".into(),
            ready_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_per_app_snapshot_records_how_the_app_was_started() {
        let boot: ImageSpec = serde_yaml_ng::from_str(
            "kernel: /k\ncmdline: x\nguest_port: 8081\ndisks: [{path: /root.img}, {path: /code/1.img}]\n",
        )
        .unwrap();
        let spec = AppTemplate {
            start: start(&[("K", "1")]),
        }
        .prepared_spec(&boot);
        assert_eq!(spec.guest_port, 8080);
        assert_eq!(spec.ready_path, "/healthz");
        assert_eq!(
            spec.prepared.as_deref(),
            Some(r#"{"env":{"K":"1"},"main":"server.js","port":8080}"#)
        );
        // Another env (or main) is another snapshot.
        let other = AppTemplate {
            start: start(&[("K", "2")]),
        }
        .prepared_spec(&boot);
        assert_ne!(spec, other);
        assert_eq!(spec.disks, other.disks);
    }
}
