//! Which snapshot each app starts from, the VMM driver the config asks
//! for, and `snapgate snapshot build`.

use std::io::Write;
use std::sync::Arc;

use crate::config::{Config, RuntimeAppConfig, RuntimeConfig, StartFrom, Upstream};
use crate::net::Network;
use crate::runtime::{self, AppTemplate, CodeImage, CodeSource, StartSpec};
use crate::snapshot::{Builder, Job};
use crate::vmm::cloud_hypervisor::CloudHypervisor;
use crate::vmm::jail::Jail;
use crate::vmm::qemu::Qemu;
use crate::vmm::{Snapshot, Vmm, VmmError, VmmKind};

/// The VMM driver the config asks for, with its jail (`vmm.jail`; none
/// when every part is off). Fails, naming the part and the key that turns
/// it off, on a host that cannot do a part that is on.
pub fn driver(config: &Config) -> Result<Arc<dyn Vmm>, VmmError> {
    let binary = config.vmm.binary();
    let jail = if config.vmm.jail.any() {
        let jail = Jail::new(
            config.vmm.jail.clone(),
            &binary,
            &config.state_dir,
            &config.network.tap_prefix,
        )?;
        tracing::debug!(
            cgroup = ?jail.cgroup_version(),
            binary = %jail.binary().display(),
            "VMMs run jailed"
        );
        Some(Arc::new(jail))
    } else {
        tracing::warn!("vmm.jail: every part is off; VMMs run as snapgate runs");
        None
    };
    Ok(match config.vmm.kind {
        VmmKind::Qemu => Arc::new(
            Qemu::new(
                binary,
                config.vmm.accel,
                &config.state_dir,
                config.network.clone(),
            )?
            .with_jail(jail),
        ),
        VmmKind::CloudHypervisor => Arc::new(
            CloudHypervisor::new(
                binary,
                &config.state_dir,
                config.network.clone(),
                config.vmm.memory_restore_mode,
            )
            .with_jail(jail),
        ),
    })
}

/// A runtime's shared snapshot.
pub fn runtime_job(name: &str, runtime: &RuntimeConfig) -> Job {
    Job {
        name: runtime::snapshot_name(name),
        spec: runtime.spec(),
        prepare: None,
    }
}

/// The own snapshot of runtime app `app` (`snapshot: app`), with its code
/// packed as `code`.
pub fn app_in_runtime_job(
    app: &str,
    cfg: &RuntimeAppConfig,
    runtime: &RuntimeConfig,
    code: &CodeImage,
) -> Job {
    Job {
        name: app.to_owned(),
        spec: runtime::app_image(runtime, &code.path),
        prepare: Some(Box::new(AppTemplate {
            start: StartSpec::new(app, cfg, runtime),
        })),
    }
}

/// The snapshot `app` starts from (packing its code if it needs it), or
/// `None` for a static app.
pub fn job_for_app(config: &Config, app: &str) -> anyhow::Result<Option<Job>> {
    Ok(Some(match config.apps[app].upstream() {
        Upstream::Static(_) => return Ok(None),
        Upstream::Vm(spec, _) => Job::vm_app(app, spec),
        Upstream::Runtime(cfg, _) => {
            let rt = &config.runtimes[&cfg.name];
            match cfg.snapshot {
                StartFrom::Runtime => runtime_job(&cfg.name, rt),
                StartFrom::App => {
                    let code = CodeSource::for_app(config, app, cfg).current()?;
                    app_in_runtime_job(app, cfg, rt, &code)
                }
            }
        }
    }))
}

/// `snapgate snapshot build`: builds the snapshots `apps` start from (every
/// VM and runtime app when empty): a VM app's own; for a runtime app, its
/// runtime's shared snapshot (once), or with `snapshot: app` the app's own.
pub async fn build(
    config: &Config,
    apps: &[String],
    out: &mut (dyn Write + Send),
) -> anyhow::Result<Vec<Snapshot>> {
    let vm_apps: Vec<&String> = config
        .apps
        .iter()
        .filter(|(_, a)| !matches!(a.upstream(), Upstream::Static(_)))
        .map(|(n, _)| n)
        .collect();
    for name in apps {
        if !vm_apps.contains(&name) {
            let known: Vec<&str> = vm_apps.iter().map(|s| s.as_str()).collect();
            anyhow::bail!(
                "no VM or runtime app {name:?} in the config (they are: {})",
                known.join(", ")
            );
        }
    }
    let selected: Vec<&String> = if apps.is_empty() {
        vm_apps
    } else {
        apps.iter().collect()
    };
    let net = Network::new(config.network.clone())?;
    let vmm = driver(config)?;
    let builder = Builder::new(vmm.as_ref(), &net, config.snapshot_dir());
    let mut built = Vec::new();
    let mut done = std::collections::HashSet::new();
    for app in selected {
        let job = job_for_app(config, app)?.expect("static apps were filtered out");
        // Apps of one runtime share its snapshot: built once.
        if done.insert(job.name.clone()) {
            built.push(builder.build(&job, out).await?);
        }
    }
    Ok(built)
}
