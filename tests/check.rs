//! `snapgate check` against a table of broken configs: each is rejected,
//! exit code non-zero, with a message naming the key (and its line).

use std::process::Command;

/// A valid base config; each case changes one thing. `/bin/sh` stands in
/// for kernel files (`check` only needs them to exist).
const BASE: &str = "\
listen: 127.0.0.1:8080
admin: 127.0.0.1:9090
apps:
  hello:
    hosts: [hello.localhost]
    image:
      kernel: /bin/sh
      cmdline: 'ip={guest_ip}'
    pool:
      min_warm: 1
      max_instances: 2
  other:
    hosts: [other.localhost]
    upstream: 127.0.0.1:3000
";

/// A valid base config with a runtime app; `/etc` stands in for its code
/// directory and `/etc/hostname` for its main module.
const RT_BASE: &str = "\
apps:
  web:
    hosts: [web.localhost]
    runtime:
      name: node
      code: /etc
      main: hostname
      env: {GREETING: hi}
runtimes:
  node:
    image:
      kernel: /bin/sh
      disks: [{path: /bin/sh}]
      cmdline: 'snapgate.agent={guest_port} snapgate.exec=/usr/bin/node,/loader.js'
      guest_port: 8081
    code_disk_mib: 64
";

fn check(text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.yaml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_snapgate"))
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Checks each (name, config, expected message) case: rejected, saying
/// what was expected. Reports every case that was not.
fn expect_rejections(cases: &[(&str, String, &str)]) {
    let mut failures = Vec::new();
    for (name, text, expect) in cases {
        let (ok, _, stderr) = check(text);
        if ok {
            failures.push(format!("{name}: accepted"));
        } else if !stderr.contains(expect) {
            failures.push(format!("{name}: wanted {expect:?} in:\n{stderr}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_base_config_passes() {
    let (ok, stdout, stderr) = check(BASE);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ok (2 apps)"), "{stdout}");
}

#[test]
fn broken_configs_are_rejected_naming_the_key() {
    let cases: &[(&str, String, &str)] = &[
        (
            "unknown key",
            BASE.replace("      min_warm: 1", "      min_wram: 1"),
            "apps.hello.pool.min_wram (line 10): unknown field `min_wram`",
        ),
        (
            "missing image file",
            BASE.replace("kernel: /bin/sh", "kernel: /nonexistent/vmlinuz"),
            "apps.hello.image.kernel (line 7): /nonexistent/vmlinuz",
        ),
        (
            "bad host pattern",
            BASE.replace("[hello.localhost]", "['hello.*.localhost']"),
            "apps.hello.hosts[0] (line 5)",
        ),
        (
            "uppercase host",
            BASE.replace("[hello.localhost]", "[Hello.localhost]"),
            "apps.hello.hosts[0]",
        ),
        (
            "host with a port",
            BASE.replace("[hello.localhost]", "['hello.localhost:8080']"),
            "remove \":port\"",
        ),
        (
            "min_warm above max_instances",
            BASE.replace("min_warm: 1", "min_warm: 3"),
            "apps.hello.pool.min_warm (line 10): 3 is above max_instances (2)",
        ),
        (
            "duplicate host across apps",
            BASE.replace("[other.localhost]", "[hello.localhost]"),
            "is also a host of app hello",
        ),
        (
            "image and upstream together",
            BASE.replace(
                "    upstream: 127.0.0.1:3000",
                "    upstream: 127.0.0.1:3000\n    image: {kernel: /bin/sh, cmdline: x}",
            ),
            "apps.other (line 12): has image (VM app) and upstream (static app)",
        ),
        (
            "neither image nor upstream",
            BASE.replace("    upstream: 127.0.0.1:3000\n", ""),
            "apps.other (line 12): needs image",
        ),
        (
            "pool on a static app",
            BASE.replace(
                "    upstream: 127.0.0.1:3000",
                "    upstream: 127.0.0.1:3000\n    pool: {min_warm: 1}",
            ),
            "apps.other.pool",
        ),
        (
            "unknown placeholder",
            BASE.replace("{guest_ip}", "{guest_addr}"),
            "apps.hello.image.cmdline (line 8): unknown placeholder {guest_addr}",
        ),
        (
            "zero max_instances",
            BASE.replace("max_instances: 2", "max_instances: 0"),
            "apps.hello.pool.max_instances",
        ),
        (
            "bad duration",
            BASE.replace("      min_warm: 1", "      idle_timeout: soon"),
            "apps.hello.pool.idle_timeout (line 10)",
        ),
        (
            "bad address",
            BASE.replace("listen: 127.0.0.1:8080", "listen: localhost"),
            "listen (line 1)",
        ),
        (
            "bad VMM kind",
            BASE.replace(
                "listen: 127.0.0.1:8080",
                "listen: 127.0.0.1:8080\nvmm: {kind: firecracker}",
            ),
            "vmm.kind (line 2): unknown variant `firecracker`",
        ),
        (
            "bad accel",
            BASE.replace(
                "listen: 127.0.0.1:8080",
                "listen: 127.0.0.1:8080\nvmm: {accel: hvf}",
            ),
            "vmm.accel",
        ),
        (
            "guest outside the tap subnet",
            BASE.replace(
                "listen: 127.0.0.1:8080",
                "listen: 127.0.0.1:8080\nnetwork: {guest_ip: 169.254.9.2}",
            ),
            "network.guest_ip",
        ),
        (
            "bad app name",
            BASE.replace("  other:", "  Other_App:"),
            "apps.Other_App",
        ),
        (
            "same listen and admin",
            BASE.replace("9090", "8080"),
            "admin (line 2): 127.0.0.1:8080 is also the listen address",
        ),
        (
            "admin off loopback without a token",
            BASE.replace("admin: 127.0.0.1:9090", "admin: 0.0.0.0:9090"),
            "admin (line 2): 0.0.0.0:9090 is not a loopback address: set admin_token_file",
        ),
        (
            "an admin token file that is not there",
            BASE.replace(
                "admin: 127.0.0.1:9090",
                "admin: 127.0.0.1:9090\nadmin_token_file: /nonexistent/admin.token",
            ),
            "admin_token_file (line 3): reading /nonexistent/admin.token: No such file",
        ),
        ("not YAML", "apps: [unclosed".to_owned(), "(line 1)"),
        (
            "no apps",
            "listen: 127.0.0.1:8080\napps: {}\n".to_owned(),
            "apps",
        ),
    ];
    expect_rejections(cases);
}

#[test]
fn broken_runtime_configs_are_rejected_naming_the_key() {
    let (ok, stdout, stderr) = check(RT_BASE);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ok (1 apps)"), "{stdout}");
    let cases: &[(&str, String, &str)] = &[
        (
            "unknown runtime",
            RT_BASE.replace("name: node", "name: deno"),
            "apps.web.runtime.name (line 5): no runtime \"deno\" (runtimes: node)",
        ),
        (
            "image and runtime together",
            RT_BASE.replace(
                "    hosts: [web.localhost]",
                "    hosts: [web.localhost]\n    image: {kernel: /bin/sh, cmdline: x}",
            ),
            "has image (VM app) and runtime (runtime app); keep one",
        ),
        (
            "missing code",
            RT_BASE.replace("code: /etc", "code: /nonexistent/app"),
            "apps.web.runtime.code (line 6): /nonexistent/app",
        ),
        (
            "main outside the code",
            RT_BASE.replace("main: hostname", "main: ../etc/passwd"),
            "apps.web.runtime.main (line 7)",
        ),
        (
            "main not in the code",
            RT_BASE.replace("main: hostname", "main: server.js"),
            "/etc/server.js is not a file",
        ),
        (
            "PORT in env",
            RT_BASE.replace("{GREETING: hi}", "{PORT: '9000'}"),
            "apps.web.runtime.env.PORT: is set by snapgate",
        ),
        (
            "bad env name",
            RT_BASE.replace("{GREETING: hi}", "{'MY-VAR': x}"),
            "apps.web.runtime.env.MY-VAR",
        ),
        (
            "unknown snapshot kind",
            RT_BASE.replace(
                "      main: hostname",
                "      main: hostname\n      snapshot: both",
            ),
            "apps.web.runtime.snapshot (line 8): unknown variant `both`",
        ),
        (
            "app port is the agent port",
            RT_BASE.replace(
                "    code_disk_mib: 64",
                "    code_disk_mib: 64\n    app_port: 8081",
            ),
            "runtimes.node.app_port (line 17): 8081 is also image.guest_port",
        ),
        (
            "zero code disk",
            RT_BASE.replace("code_disk_mib: 64", "code_disk_mib: 0"),
            "runtimes.node.code_disk_mib (line 16): 0 is not within 1..=16384",
        ),
        (
            "runtime image file missing",
            RT_BASE.replace("kernel: /bin/sh", "kernel: /nonexistent/vmlinuz"),
            "runtimes.node.image.kernel (line 12)",
        ),
        (
            "no agent on the runtime's cmdline",
            RT_BASE.replace("snapgate.agent={guest_port} ", ""),
            "runtimes.node.image.cmdline (line 14): needs snapgate.agent={guest_port}",
        ),
        (
            "agent on another port than guest_port",
            RT_BASE.replace("snapgate.agent={guest_port}", "snapgate.agent=9000"),
            "snapgate.agent=9000 is not guest_port (8081)",
        ),
        (
            "no runtime command",
            RT_BASE.replace(" snapgate.exec=/usr/bin/node,/loader.js", ""),
            "needs snapgate.exec=",
        ),
        (
            "code disk not where the agent looks",
            RT_BASE.replace("      disks: [{path: /bin/sh}]\n", ""),
            "runtimes.node.image.disks: with 0 disk(s) the code disk is not /dev/vdb",
        ),
        (
            "a field snapgate sets",
            RT_BASE.replace(
                "      guest_port: 8081",
                "      guest_port: 8081\n      extra_disk_mib: 4",
            ),
            "runtimes.node.image.extra_disk_mib (line 16): is set by snapgate",
        ),
        (
            "pool key misspelt on a runtime",
            RT_BASE.replace("code_disk_mib: 64", "min_wram: 1"),
            "runtimes.node.min_wram (line 16): unknown field",
        ),
    ];
    expect_rejections(cases);
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = BASE
        .replace("min_warm: 1", "min_warm: 3")
        .replace("[other.localhost]", "[hello.localhost]");
    let (ok, _, stderr) = check(&text);
    assert!(!ok);
    assert!(stderr.contains("has 2 problem(s)"), "{stderr}");
}

#[test]
fn the_shipped_proxy_yaml_parses() {
    // Its image files exist only after scripts/build-guest and
    // scripts/build-node-runtime; everything else must check out.
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.yaml")).unwrap();
    let config = snapgate::config::Config::parse(&text).unwrap_or_else(|p| panic!("{p}"));
    let problems: Vec<String> = config
        .validate()
        .into_iter()
        .filter(|p| {
            let built = [
                "apps.hello.image.kernel",
                "apps.hello.image.initramfs",
                "runtimes.node.image.kernel",
                "runtimes.node.image.initramfs",
                "runtimes.node.image.disks[0].path",
            ];
            !built.contains(&p.key.as_str())
        })
        .map(|p| p.to_string())
        .collect();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(config.admin.to_string(), "127.0.0.1:9090");
    let pool = config.apps["hello"].pool.clone().unwrap();
    assert_eq!(pool.min_warm, 1);
    assert_eq!(pool.idle_timeout.as_secs(), 30);
    let node = config.apps["node-hello"].runtime.clone().unwrap();
    assert_eq!(node.name, "node");
    assert!(config.apps["node-hello"]
        .hosts
        .contains(&"node.localhost".to_owned()));
    assert_eq!(config.runtimes["node"].min_warm, 1);
}

#[test]
fn version_names_the_commit() {
    let out = Command::new(env!("CARGO_BIN_EXE_snapgate"))
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.starts_with(&format!("snapgate {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
}

#[test]
fn admin_token_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let with_token = |name: &str, token: &[u8]| {
        let file = dir.path().join(name);
        std::fs::write(&file, token).unwrap();
        check(&BASE.replace(
            "admin: 127.0.0.1:9090",
            &format!("admin: 0.0.0.0:9090\nadmin_token_file: {}", file.display()),
        ))
    };
    let (ok, out, err) = with_token("good", b"0123456789abcdef0123\n");
    assert!(ok, "{out}{err}");
    for (name, token, why) in [
        (
            "short",
            &b"short-token\n"[..],
            "a token of 11 characters; at least 16",
        ),
        ("control", b"aaaaaaaa\x01bbbbbbbbb\n", "a control character"),
        ("empty", b"", "a token of 0 characters"),
    ] {
        let (ok, _, err) = with_token(name, token);
        assert!(!ok, "{name}: accepted");
        assert!(
            err.contains("admin_token_file (line 3)") && err.contains(why),
            "{name}: {err}"
        );
    }
}

/// `snapgate run` with stderr not a terminal (`--log-format auto`) writes
/// one JSON object per log line; `--log-format text` writes text.
#[test]
fn log_lines_are_json_when_not_on_a_terminal() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.yaml");
    std::fs::write(
        &file,
        format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nstate_dir: {}\nnetwork: {{ tap_prefix: sglog }}\n\
             apps:\n  site:\n    hosts: [site.test]\n    upstream: 127.0.0.1:9\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let serving_line = |format: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_snapgate"))
            .args(["--log-format", format, "run", "--config"])
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        // Read on a thread: the line must come within the deadline.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("serving") {
                    let _ = tx.send(line);
                    return;
                }
            }
        });
        let line = rx.recv_timeout(std::time::Duration::from_secs(30));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
        line.expect("a log line saying it serves")
    };
    let json: serde_json::Value =
        serde_json::from_str(&serving_line("auto")).expect("auto, not on a terminal: JSON");
    assert_eq!(json["level"], "INFO", "{json}");
    assert_eq!(json["fields"]["message"], "serving", "{json}");
    assert!(
        json["fields"]["listen"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{json}"
    );
    assert!(json["timestamp"].is_string(), "{json}");
    let text = serving_line("text");
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_err(),
        "{text}"
    );
    assert!(text.contains("INFO") && text.contains("serving"), "{text}");
}
