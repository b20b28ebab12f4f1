//! A minimal QMP client: JSON lines over the VM's Unix socket.
//!
//! Hand-written on purpose: snapgate issues a handful of commands and reads their
//! `return` or `error`; the QMP crates on crates.io generate bindings from
//! one QEMU schema version, while snapgate must drive both Debian's QEMU 7.2
//! and newer releases. QMP is one JSON object per line; asynchronous events
//! may arrive between a command and its reply and are skipped here.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::{VmId, VmProcess, VmmError};

/// How long one QMP command may take before the VMM is deemed hung.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Qmp {
    vm: VmId,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects once QEMU listens on `path`, reads the greeting and enters
    /// command mode. Fails at once if the process exits, or at `deadline`.
    pub async fn connect(
        vm: &VmId,
        path: &Path,
        process: &mut VmProcess,
        deadline: Instant,
    ) -> Result<Qmp, VmmError> {
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) => {
                    if process.exited().is_some() {
                        return Err(process.exited_error("starting"));
                    }
                    if Instant::now() >= deadline {
                        return Err(VmmError::Control {
                            vm: vm.clone(),
                            what: format!("QMP socket {} never accepted", path.display()),
                            source: e,
                        });
                    }
                    // QEMU creates the socket a few ms after exec.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        Qmp::handshake(vm, stream, left).await
    }

    /// Connects to the QMP socket of a VM that runs (one attempt), within
    /// `within`: for checks made while something else waits on the VM.
    /// QEMU serves one QMP client at a time: while another holds the
    /// socket, the greeting does not come and this times out.
    pub async fn attach(vm: &VmId, path: &Path, within: Duration) -> Result<Qmp, VmmError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| VmmError::Control {
                vm: vm.clone(),
                what: format!("connecting to QMP socket {}", path.display()),
                source,
            })?;
        Qmp::handshake(vm, stream, within).await
    }

    /// Reads the greeting and enters command mode, within `within`: a QEMU
    /// that accepts the socket but hangs in its start-up must not hold the
    /// caller.
    async fn handshake(vm: &VmId, stream: UnixStream, within: Duration) -> Result<Qmp, VmmError> {
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            vm: vm.clone(),
            reader: BufReader::new(r),
            writer: w,
        };
        let handshake = async {
            let greeting = qmp.read_message().await?;
            if greeting.get("QMP").is_none() {
                return Err(qmp.protocol_error("greeting", &greeting));
            }
            qmp.execute("qmp_capabilities", None).await.map(drop)
        };
        match tokio::time::timeout(within, handshake).await {
            Ok(Ok(())) => Ok(qmp),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(VmmError::Timeout {
                vm: vm.clone(),
                step: "the QMP greeting",
                after: within,
            }),
        }
    }

    /// Runs one command; returns its `return` value or the QMP error.
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, VmmError> {
        self.execute_with_fd(command, args, None).await
    }

    /// Hands `fd` to QEMU under `name` (QMP `getfd`: the fd rides on the
    /// command's message as SCM_RIGHTS), for a later `fd:<name>` URI.
    pub async fn pass_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), VmmError> {
        self.execute_with_fd("getfd", Some(json!({ "fdname": name })), Some(fd))
            .await
            .map(drop)
    }

    async fn execute_with_fd(
        &mut self,
        command: &str,
        args: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, VmmError> {
        use sendfd::SendWithFd;

        let mut msg = json!({ "execute": command });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let io = |what: &str, source| VmmError::Control {
            vm: self.vm.clone(),
            what: format!("{what} QMP {command}"),
            source,
        };
        let mut sent = 0;
        if let Some(fd) = fd {
            let stream: &UnixStream = self.writer.as_ref();
            // The fd rides on the first sendmsg; the rest is plain data.
            sent = loop {
                stream.writable().await.map_err(|e| io("sending", e))?;
                match stream.send_with_fd(line.as_bytes(), &[fd.as_raw_fd()]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(io("sending", e)),
                }
            };
        }
        self.writer
            .write_all(&line.as_bytes()[sent..])
            .await
            .map_err(|e| io("sending", e))?;
        let reply = tokio::time::timeout(COMMAND_TIMEOUT, async {
            loop {
                let msg = self.read_message().await?;
                if msg.get("event").is_some() {
                    continue;
                }
                return Ok::<Value, VmmError>(msg);
            }
        })
        .await
        .map_err(|_| VmmError::Qmp {
            vm: self.vm.clone(),
            command: command.to_owned(),
            message: format!("no reply within {COMMAND_TIMEOUT:?}"),
        })??;
        if let Some(ret) = reply.get("return") {
            return Ok(ret.clone());
        }
        let message = reply
            .pointer("/error/desc")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| reply.to_string());
        Err(VmmError::Qmp {
            vm: self.vm.clone(),
            command: command.to_owned(),
            message,
        })
    }

    async fn read_message(&mut self) -> Result<Value, VmmError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|source| VmmError::Control {
                vm: self.vm.clone(),
                what: "reading QMP".into(),
                source,
            })?;
        if n == 0 {
            return Err(VmmError::Control {
                vm: self.vm.clone(),
                what: "QMP connection closed".into(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| VmmError::Qmp {
            vm: self.vm.clone(),
            command: "(read)".into(),
            message: format!("not JSON ({e}): {}", line.trim_end()),
        })
    }

    fn protocol_error(&self, what: &str, got: &Value) -> VmmError {
        VmmError::Qmp {
            vm: self.vm.clone(),
            command: what.to_owned(),
            message: format!("unexpected message {got}"),
        }
    }
}
