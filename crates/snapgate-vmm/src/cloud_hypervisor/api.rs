//! Cloud Hypervisor's REST API on its `--api-socket`.
//!
//! Plain calls go through reqwest over the Unix socket. Two calls carry tap
//! fds (`vm.add-net`, `vm.restore`): CH takes them as `SCM_RIGHTS` ancillary
//! data on the request's socket, which no HTTP client crate can attach, so
//! those requests are written by hand ([`put_with_fds`]): one PUT with a JSON
//! body, sent with its fds in one `sendmsg`, and a response parsed with
//! httparse. Errors come back as a JSON array of strings (CH's error chain),
//! surfaced in [`VmmError::Api`].

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::{VmId, VmProcess, VmmError};

/// How long one API call may take before the VMM is deemed hung.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A client for one Cloud Hypervisor process.
#[derive(Clone, Debug)]
pub struct ChClient {
    vm: VmId,
    socket: PathBuf,
    http: reqwest::Client,
}

impl ChClient {
    /// A client for the API socket at `socket`, labelled `vm` in errors.
    pub fn new(vm: VmId, socket: impl Into<PathBuf>) -> ChClient {
        let socket = socket.into();
        let http = reqwest::Client::builder()
            .unix_socket(socket.clone())
            .timeout(CALL_TIMEOUT)
            .build()
            .expect("reqwest client with default TLS-free settings builds");
        ChClient { vm, socket, http }
    }

    /// The API socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn url(endpoint: &str) -> String {
        format!("http://localhost/api/v1/{endpoint}")
    }

    async fn call(
        &self,
        method: reqwest::Method,
        endpoint: &str,
        body: Option<&Value>,
    ) -> Result<Option<Value>, VmmError> {
        let mut req = self.http.request(method, Self::url(endpoint));
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| VmmError::Control {
            vm: self.vm.clone(),
            what: format!("{endpoint}: {e}"),
            source: std::io::Error::other(e),
        })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| VmmError::Control {
            vm: self.vm.clone(),
            what: format!("reading the {endpoint} response"),
            source: std::io::Error::other(e),
        })?;
        self.decode(endpoint, status, &bytes)
    }

    fn decode(&self, endpoint: &str, status: u16, body: &[u8]) -> Result<Option<Value>, VmmError> {
        if (200..300).contains(&status) {
            if body.is_empty() {
                return Ok(None);
            }
            return serde_json::from_slice(body)
                .map(Some)
                .map_err(|e| VmmError::Api {
                    vm: self.vm.clone(),
                    endpoint: endpoint.to_owned(),
                    status,
                    chain: vec![format!("response is not JSON: {e}")],
                });
        }
        let chain = match serde_json::from_slice::<Vec<String>>(body) {
            Ok(chain) if !chain.is_empty() => chain,
            _ => vec![String::from_utf8_lossy(body).trim().to_owned()],
        };
        Err(VmmError::Api {
            vm: self.vm.clone(),
            endpoint: endpoint.to_owned(),
            status,
            chain,
        })
    }

    async fn get(&self, endpoint: &str) -> Result<Value, VmmError> {
        self.call(reqwest::Method::GET, endpoint, None)
            .await?
            .ok_or_else(|| VmmError::Api {
                vm: self.vm.clone(),
                endpoint: endpoint.to_owned(),
                status: 200,
                chain: vec!["empty response".into()],
            })
    }

    async fn put(&self, endpoint: &str, body: Option<&Value>) -> Result<(), VmmError> {
        self.call(reqwest::Method::PUT, endpoint, body)
            .await
            .map(drop)
    }

    /// `GET vmm.ping`: `{build_version, version, pid, features}`.
    pub async fn ping(&self) -> Result<Value, VmmError> {
        self.get("vmm.ping").await
    }

    /// Pings until the VMM answers; fails at once if `process` exits, or at
    /// `deadline`.
    pub async fn wait_for_api(
        &self,
        process: &mut VmProcess,
        deadline: Instant,
    ) -> Result<(), VmmError> {
        loop {
            match self.ping().await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    if process.exited().is_some() {
                        return Err(process.exited_error("starting"));
                    }
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    // CH opens its socket a few ms after exec.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }

    /// `PUT vm.create` with a VmConfig.
    pub async fn create(&self, config: &Value) -> Result<(), VmmError> {
        self.put("vm.create", Some(config)).await
    }

    /// `PUT vm.add-net` with a NetConfig and the tap's fd(s) attached.
    pub async fn add_net(&self, net: &Value, fds: &[BorrowedFd<'_>]) -> Result<(), VmmError> {
        self.put_fds("vm.add-net", net, fds).await
    }

    /// `PUT vm.boot`.
    pub async fn boot(&self) -> Result<(), VmmError> {
        self.put("vm.boot", None).await
    }

    /// `PUT vm.pause`.
    pub async fn pause(&self) -> Result<(), VmmError> {
        self.put("vm.pause", None).await
    }

    /// `PUT vm.resume`.
    pub async fn resume(&self) -> Result<(), VmmError> {
        self.put("vm.resume", None).await
    }

    /// `PUT vm.snapshot` into the directory `dest` (which must exist).
    pub async fn snapshot(&self, dest: &Path) -> Result<(), VmmError> {
        let body = serde_json::json!({ "destination_url": file_url(dest) });
        self.put("vm.snapshot", Some(&body)).await
    }

    /// `PUT vm.restore` with a RestoreConfig whose `net_fds` count matches the
    /// fds attached.
    pub async fn restore(&self, config: &Value, fds: &[BorrowedFd<'_>]) -> Result<(), VmmError> {
        self.put_fds("vm.restore", config, fds).await
    }

    /// `GET vm.info`: `{config, state, memory_actual_size, device_tree}`.
    pub async fn info(&self) -> Result<Value, VmmError> {
        self.get("vm.info").await
    }

    /// The VM state from `vm.info`: Created, Running, Shutdown or Paused.
    pub async fn state(&self) -> Result<String, VmmError> {
        Ok(self.info().await?["state"]
            .as_str()
            .unwrap_or("unknown")
            .to_owned())
    }

    /// `PUT vm.shutdown`.
    pub async fn shutdown(&self) -> Result<(), VmmError> {
        self.put("vm.shutdown", None).await
    }

    /// `PUT vm.delete`.
    pub async fn delete(&self) -> Result<(), VmmError> {
        self.put("vm.delete", None).await
    }

    /// `PUT vmm.shutdown`: the process exits.
    pub async fn vmm_shutdown(&self) -> Result<(), VmmError> {
        self.put("vmm.shutdown", None).await
    }

    async fn put_fds(
        &self,
        endpoint: &str,
        body: &Value,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), VmmError> {
        let body = serde_json::to_vec(body).expect("JSON value serializes");
        let raw: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let path = format!("/api/v1/{endpoint}");
        let call = put_with_fds(&self.socket, &path, &body, &raw);
        let (status, resp) = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| VmmError::Timeout {
                vm: self.vm.clone(),
                step: "an API call with fds",
                after: CALL_TIMEOUT,
            })?
            .map_err(|source| VmmError::Control {
                vm: self.vm.clone(),
                what: format!("{endpoint} (with {} fds)", fds.len()),
                source,
            })?;
        self.decode(endpoint, status, &resp).map(drop)
    }
}

/// `file://` URL of a local directory.
pub fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// Sends `PUT path` with a JSON `body` and `fds` as SCM_RIGHTS on one Unix
/// socket connection; returns the status and body of the response.
pub async fn put_with_fds(
    socket: &Path,
    path: &str,
    body: &[u8],
    fds: &[i32],
) -> std::io::Result<(u16, Vec<u8>)> {
    use sendfd::SendWithFd;

    let mut stream = UnixStream::connect(socket).await?;
    let mut request = format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    // The fds ride on the first sendmsg; the rest, if any, is plain data.
    let sent = loop {
        stream.writable().await?;
        match stream.send_with_fd(&request, fds) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    stream.write_all(&request[sent..]).await?;

    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a full response",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let parsed = resp
            .parse(&buf)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if let httparse::Status::Complete(head_len) = parsed {
            let status = resp.code.unwrap_or(0);
            let len = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
                .unwrap_or(0);
            while buf.len() < head_len + len {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let end = buf.len().min(head_len + len);
            return Ok((status, buf[head_len..end].to_vec()));
        }
    }
}
