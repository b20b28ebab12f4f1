//! The status page at `/` on the admin listener: apps, instances by
//! state, runtime stocks, recent cold starts and restore failures, as one
//! server-rendered HTML page with its style inline and nothing loaded
//! from elsewhere, refreshing itself every [`REFRESH_SECONDS`]. Every
//! value is escaped by `maud`.

use std::time::{Duration, SystemTime};

use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::Serving;
use crate::pool::MemberState;
use crate::proxy::Target;

/// How often the page reloads itself.
pub const REFRESH_SECONDS: u32 = 5;

/// The page's style: system fonts, no external asset.
const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d232a;background:#fafbfc}\
h1{font-size:1.5em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .4em}\
table{border-collapse:collapse;min-width:40em}th,td{padding:.25em .8em;text-align:left;border-bottom:1px solid #dde1e6}\
th{background:#eef1f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.muted{color:#66707a}.bad{color:#b3261e}.state{display:inline-block;padding:0 .5em;border-radius:.6em;font-size:.9em}\
.warm{background:#d8f0dd}.leased{background:#d6e6fb}.restoring{background:#fdf0c4}.draining{background:#f6d7d5}\
code{font-size:.95em}td.err{white-space:pre-wrap}";

/// The page, as it stands now.
pub fn render(serving: &Serving) -> String {
    let now = SystemTime::now();
    let table = serving.apps.table();
    let mut targets: Vec<_> = table.targets().iter().collect();
    targets.sort_by_key(|(name, _)| *name);
    let rows = super::members(&table, None);
    let mut by_state = [0usize; 4];
    for (_, m) in &rows {
        by_state[state_index(m.state)] += 1;
    }
    let mut stocks: Vec<_> = super::lock(&serving.runtimes)
        .iter()
        .map(|(name, rt)| (name.clone(), rt.stock(), rt.min_warm(), rt.last_error()))
        .collect();
    stocks.sort_by(|a, b| a.0.cmp(&b.0));
    let cold = serving.recent.cold_starts();
    let failures = serving.recent.failures();
    let up = now.duration_since(serving.started).unwrap_or_default();
    let page: Markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content=(REFRESH_SECONDS);
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "snapgate status" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "snapgate" }
                p.muted {
                    (env!("CARGO_PKG_VERSION")) " · serving for " (age(up))
                    " · " (humantime::format_rfc3339_seconds(now))
                    " · refreshes every " (REFRESH_SECONDS) " s"
                }
                h2 { "Apps" }
                table #apps {
                    tr { th { "app" } th { "kind" } th { "warm" } th { "leased" } th { "restoring" }
                         th { "draining" } th { "held" } th { "min_warm / max" } th { "last error" } }
                    @for (name, target) in &targets {
                        @match &***target {
                            Target::Pool { pool, .. } => {
                                @let s = pool.stats();
                                @let z = pool.sizing();
                                tr {
                                    td { (name) } td { "pool" }
                                    td.n { (s.warm()) } td.n { (s.leased) } td.n { (s.restoring) }
                                    td.n { (s.draining) } td.n { (s.queued) }
                                    td.n { (z.min_warm) " / " (z.max_instances) }
                                    td.bad.err { (pool.last_error().unwrap_or_default()) }
                                }
                            }
                            Target::Static { upstream, .. } => {
                                tr {
                                    td { (name) } td { "static" }
                                    td.muted colspan="7" { "upstream " (upstream.addr()) }
                                }
                            }
                        }
                    }
                }
                h2 { "Instances" }
                p id="by-state" {
                    @for (i, state) in STATES.iter().enumerate() {
                        span class={ "state " (state.as_str()) } { (state.as_str()) " " (by_state[i]) }
                        " "
                    }
                }
                @if rows.is_empty() {
                    p.muted { "No instances: every app is scaled to zero." }
                } @else {
                    table #instances {
                        tr { th { "instance" } th { "app" } th { "state" } th { "age" } th { "in flight" }
                             th { "idle" } th { "VMM pid" } th { "tap" } }
                        @for (app, m) in &rows {
                            tr {
                                td { code { (m.name) } } td { (app) }
                                td { span class={ "state " (m.state.as_str()) } { (m.state.as_str()) } }
                                td.n { (age(m.age)) } td.n { (m.in_flight) }
                                td.n { (m.idle_for.map(age).unwrap_or_default()) }
                                td.n { (m.detail.as_ref().map(|d| d.pid.to_string()).unwrap_or_default()) }
                                td { (m.detail.as_ref().map(|d| d.tap.clone()).unwrap_or_default()) }
                            }
                        }
                    }
                }
                @if !stocks.is_empty() {
                    h2 { "Runtime stocks" }
                    table #runtimes {
                        tr { th { "runtime" } th { "warm" } th { "restoring" } th { "min_warm" } th { "last error" } }
                        @for (name, (warm, restoring), min_warm, last_error) in &stocks {
                            tr {
                                td { (name) } td.n { (warm) } td.n { (restoring) } td.n { (min_warm) }
                                td.bad.err { (last_error.clone().unwrap_or_default()) }
                            }
                        }
                    }
                }
                h2 { "Recent cold starts" }
                @if cold.is_empty() {
                    p.muted { "None yet." }
                } @else {
                    table id="cold-starts" {
                        tr { th { "when" } th { "app" } th { "path" } th { "held for" } }
                        @for c in &cold {
                            tr {
                                td { (ago(now, c.at)) } td { (c.app) } td { (c.path) }
                                td.n { (format!("{:.1} ms", c.waited.as_secs_f64() * 1e3)) }
                            }
                        }
                    }
                }
                h2 { "Restore failures" }
                @if failures.is_empty() {
                    p.muted { "None." }
                } @else {
                    table #failures {
                        tr { th { "when" } th { "app or runtime" } th { "reason" } th { "after" } th { "error" } }
                        @for f in &failures {
                            tr {
                                td { (ago(now, f.at)) } td { (f.app) } td.bad { (f.reason) }
                                td.n { (format!("{:.1} s", f.took.as_secs_f64())) }
                                td.err { code { (f.error) } }
                            }
                        }
                    }
                }
            }
        }
    };
    page.into_string()
}

/// The states in the order the page counts them.
const STATES: [MemberState; 4] = [
    MemberState::Warm,
    MemberState::Leased,
    MemberState::Restoring,
    MemberState::Draining,
];

fn state_index(s: MemberState) -> usize {
    STATES.iter().position(|x| *x == s).unwrap_or(0)
}

/// A duration as people read it: `850 ms`, `12 s`, `4 min`, `3 h`.
fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{} ms", d.as_millis()),
        1..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

/// How long before `now` `at` was.
fn ago(now: SystemTime, at: SystemTime) -> String {
    format!("{} ago", age(now.duration_since(at).unwrap_or_default()))
}
