//! The `snapgate status`, `reload`, `drain` and `prewarm` commands: a
//! client of a running gateway's admin API ([`crate::admin`]).
//!
//! The gateway is found by `--config FILE` (its `admin` address and
//! `admin_token_file`, as the gateway itself reads them) or by `--admin
//! ADDR` and `--token-file FILE`; by default `127.0.0.1:9090`, the
//! default admin address.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::config::Config;

/// How long a command waits for the admin API (a reload may build
/// snapshots: its own wait is longer).
const TIMEOUT: Duration = Duration::from_secs(30);
/// How long `reload` waits.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A running gateway's admin API.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    /// The admin API at `admin`, else `config`'s `admin` address, else
    /// `127.0.0.1:9090`; with the token in `token_file`, else in `config`'s
    /// `admin_token_file`, else none. An unspecified address (`0.0.0.0`)
    /// is reached on loopback. Errors: a config file or token file that
    /// cannot be read.
    pub fn new(
        config: Option<&Path>,
        admin: Option<SocketAddr>,
        token_file: Option<&Path>,
    ) -> anyhow::Result<AdminClient> {
        let (addr, token_file): (SocketAddr, Option<PathBuf>) = match config {
            Some(file) => {
                let c = Config::load_unchecked(file)?;
                (
                    admin.unwrap_or(c.admin),
                    token_file.map(Path::to_owned).or(c.admin_token_file),
                )
            }
            None => (
                admin.unwrap_or_else(crate::config::default_admin),
                token_file.map(Path::to_owned),
            ),
        };
        let token = token_file
            .map(|path| crate::admin::token_in(&path))
            .transpose()?;
        // An unspecified address (a gateway bound to all interfaces) is
        // reached on loopback.
        let addr = match addr.ip().is_unspecified() {
            true if addr.is_ipv4() => SocketAddr::from(([127, 0, 0, 1], addr.port())),
            true => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
            false => addr,
        };
        Ok(AdminClient {
            base: format!("http://{addr}"),
            token,
            // Never through a proxy from the environment: the token goes
            // to the gateway only.
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(TIMEOUT)
                .build()
                .context("making the HTTP client")?,
        })
    }

    /// `method path`, its JSON answer; a clear error for a gateway that
    /// does not answer or answers with an error.
    async fn call(&self, post: bool, path: &str, timeout: Duration) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = match post {
            true => self.http.post(&url),
            false => self.http.get(&url),
        }
        .timeout(timeout);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.with_context(|| {
            format!(
                "no answer from the admin API at {} (is the gateway running? --config or --admin names it)",
                self.base
            )
        })?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            let why = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| body.trim().to_owned());
            bail!("{path}: {status}: {why}");
        }
        Ok(serde_json::from_str(&body).unwrap_or(Value::String(body)))
    }

    /// `snapgate status`: the apps and instances as tables.
    pub async fn status(&self) -> anyhow::Result<String> {
        let apps = self.call(false, "/apps", TIMEOUT).await?;
        let instances = self.call(false, "/instances", TIMEOUT).await?;
        Ok(render_status(&apps, &instances))
    }

    /// `snapgate reload`: what the gateway said.
    pub async fn reload(&self) -> anyhow::Result<String> {
        match self.call(true, "/reload", RELOAD_TIMEOUT).await? {
            Value::String(s) => Ok(s.trim().to_owned()),
            other => Ok(other.to_string()),
        }
    }

    /// `snapgate drain ID`.
    pub async fn drain(&self, id: &str) -> anyhow::Result<String> {
        let path = format!("/instances/{}/drain", encode(id));
        let v = self.call(true, &path, TIMEOUT).await?;
        Ok(format!(
            "draining {} of {}: it takes no new requests and stops once those in flight end",
            v["drained"].as_str().unwrap_or(id),
            v["app"].as_str().unwrap_or("?")
        ))
    }

    /// `snapgate prewarm APP --count N`.
    pub async fn prewarm(&self, app: &str, count: usize) -> anyhow::Result<String> {
        let path = format!("/apps/{}/prewarm?count={count}", encode(app));
        let v = self.call(true, &path, TIMEOUT).await?;
        let mut out = format!(
            "{app}: {} restore(s) started toward {count} warm instance(s)",
            v["started"].as_u64().unwrap_or(0)
        );
        if let Some(over) = v["over_max_instances"].as_u64().filter(|n| *n > 0) {
            let _ = write!(
                out,
                "; {over} more would pass max_instances ({})",
                cell(&v["max_instances"])
            );
        }
        Ok(out)
    }
}

/// What a path segment leaves as it is: RFC 3986's unreserved characters
/// (section 2.3).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A path segment, percent-encoded.
fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string()
}

/// Seconds as `1h02m`, `3m04s` or `5.2s`.
fn age(v: &Value) -> String {
    let Some(s) = v.as_f64() else {
        return "-".into();
    };
    let whole = s as u64;
    match whole {
        0..=59 => format!("{s:.1}s"),
        60..=3599 => format!("{}m{:02}s", whole / 60, whole % 60),
        _ => format!("{}h{:02}m", whole / 3600, (whole % 3600) / 60),
    }
}

/// A `last_error` as the NOTE column writes it.
fn failing(last_error: &Value) -> String {
    last_error
        .as_str()
        .map_or_else(|| "-".into(), |e| format!("failing: {e}"))
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Rows as aligned columns under `head`.
fn columns(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            let _ = write!(l, "{c:<w$}  ", w = width[i]);
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, &mut head.iter().copied());
    for row in rows {
        line(&mut out, &mut row.iter().map(String::as_str));
    }
    out
}

/// The `status` tables, from the answers of `GET /apps` and
/// `GET /instances`.
pub fn render_status(apps: &Value, instances: &Value) -> String {
    let empty = Vec::new();
    let app_rows: Vec<Vec<String>> = apps["apps"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|a| match a["type"].as_str() {
            Some("static") => {
                let mut row = vec![cell(&a["name"]), "static".into()];
                // No pool: a dash under each of its six columns.
                row.extend(std::iter::repeat_n("-".to_owned(), 6));
                row.push(format!("upstream {}", cell(&a["upstream"])));
                row
            }
            _ => {
                let p = &a["pool"];
                let s = &a["settings"];
                vec![
                    cell(&a["name"]),
                    "pool".into(),
                    cell(&p["warm"]),
                    cell(&p["leased"]),
                    cell(&p["restoring"]),
                    cell(&p["draining"]),
                    cell(&p["queued"]),
                    format!("{}..{}", cell(&s["min_warm"]), cell(&s["max_instances"])),
                    failing(&a["last_error"]),
                ]
            }
        })
        .collect();
    let mut out = columns(
        &[
            "APP",
            "TYPE",
            "WARM",
            "LEASED",
            "RESTORING",
            "DRAINING",
            "HELD",
            "MIN..MAX",
            "NOTE",
        ],
        &app_rows,
    );
    let stocks = apps["runtimes"].as_array().unwrap_or(&empty);
    if !stocks.is_empty() {
        let rows: Vec<Vec<String>> = stocks
            .iter()
            .map(|r| {
                vec![
                    cell(&r["name"]),
                    cell(&r["warm"]),
                    cell(&r["restoring"]),
                    cell(&r["min_warm"]),
                    failing(&r["last_error"]),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&columns(
            &["RUNTIME", "WARM", "RESTORING", "MIN", "NOTE"],
            &rows,
        ));
    }
    let rows: Vec<Vec<String>> = instances["instances"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|i| {
            vec![
                cell(&i["id"]),
                cell(&i["app"]),
                cell(&i["state"]),
                age(&i["age_seconds"]),
                cell(&i["in_flight"]),
                age(&i["idle_seconds"]),
                cell(&i["vmm_pid"]),
                cell(&i["tap"]),
            ]
        })
        .collect();
    out.push('\n');
    if rows.is_empty() {
        out.push_str("no instances: every app is at zero\n");
    } else {
        out.push_str(&columns(
            &[
                "INSTANCE",
                "APP",
                "STATE",
                "AGE",
                "IN-FLIGHT",
                "IDLE",
                "VMM PID",
                "TAP",
            ],
            &rows,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_renders_apps_stocks_and_instances_as_aligned_tables() {
        let apps = serde_json::json!({
            "apps": [
                {"name": "hello", "type": "pool",
                 "pool": {"warm": 1, "leased": 2, "restoring": 0, "draining": 1, "queued": 3},
                 "settings": {"min_warm": 1, "max_instances": 4},
                 "last_error": null},
                {"name": "site", "type": "static", "upstream": "127.0.0.1:8000"},
                {"name": "broken", "type": "pool",
                 "pool": {"warm": 0, "leased": 0, "restoring": 0, "draining": 0, "queued": 0},
                 "settings": {"min_warm": 1, "max_instances": 2},
                 "last_error": "the guest did not answer"}
            ],
            "runtimes": [{"name": "node", "warm": 2, "restoring": 0, "min_warm": 2, "last_error": null}]
        });
        let instances = serde_json::json!({"instances": [
            {"id": "hello-1", "app": "hello", "state": "leased", "age_seconds": 125.0,
             "in_flight": 2, "idle_seconds": null, "vmm_pid": 4242, "tap": "sg0"}
        ]});
        let out = render_status(&apps, &instances);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("APP "), "{out}");
        let hello = lines.iter().find(|l| l.starts_with("hello ")).unwrap();
        assert!(hello.contains("pool") && hello.contains("1..4"), "{hello}");
        // Columns line up: WARM starts where the header's does.
        let col = lines[0].find("WARM").unwrap();
        assert_eq!(&hello[col..col + 1], "1", "{out}");
        assert!(out.contains("upstream 127.0.0.1:8000"), "{out}");
        assert!(out.contains("failing: the guest did not answer"), "{out}");
        assert!(out.contains("RUNTIME") && out.contains("node"), "{out}");
        let vm = lines.iter().find(|l| l.starts_with("hello-1")).unwrap();
        for want in ["leased", "2m05s", "4242", "sg0"] {
            assert!(vm.contains(want), "{want} in {vm}");
        }
        let none = render_status(
            &serde_json::json!({"apps": []}),
            &serde_json::json!({"instances": []}),
        );
        assert!(none.contains("no instances"), "{none}");
    }
}
