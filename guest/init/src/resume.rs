//! The "resumed" message: what makes a clone its own.
//!
//! A snapshot freezes the guest kernel's random generator and its clock;
//! every clone of it resumes with both as they were. Before a clone serves
//! anything, snapgate sends it one message, as the JSON body of a POST
//! (to the guest agent's `/resumed`, to a VM app's `on_restore` path, or
//! inside an agent's start message):
//!
//! ```json
//! {"now_ms": 1764500000123, "entropy": "<64 hex digits: 32 bytes>"}
//! ```
//!
//! `now_ms` is the host's clock (ms since the Unix epoch) when the message
//! was sent; `entropy` is 32 bytes the host drew from its own kernel for
//! this clone alone. [`apply`] adds the bytes to the guest kernel's input
//! pool, credited as full entropy (`RNDADDENTROPY`: they come from the
//! host's generator), forces the kernel's generator to reseed from the pool
//! at once (`RNDRESEEDCRNG`: from the input pool since Linux 5.12 and the
//! stable kernels that took that fix; before 5.18 only from a pool credited
//! with enough entropy, hence the credit), then sets the clock. From then on `getrandom(2)` and `/dev/urandom` differ from every
//! other clone's.

/// A parsed resumed message.
pub struct Resumed {
    /// The host's clock, ms since the Unix epoch.
    pub now_ms: u64,
    /// Fresh host entropy for this clone.
    pub entropy: Vec<u8>,
}

/// How many entropy bytes a message carries.
pub const ENTROPY_BYTES: usize = 32;

impl Resumed {
    /// Reads the message from a JSON value (see the module doc).
    pub fn from_json(v: &serde_json::Value) -> Result<Resumed, String> {
        let now_ms = v["now_ms"]
            .as_u64()
            .ok_or("resumed message: \"now_ms\" must be a number of ms since the epoch")?;
        let hex = v["entropy"]
            .as_str()
            .ok_or("resumed message: \"entropy\" must be a string of hex digits")?;
        let entropy = hex::decode(hex).map_err(|_| "resumed message: \"entropy\" is not hex")?;
        if entropy.len() != ENTROPY_BYTES {
            return Err(format!(
                "resumed message: \"entropy\" has {} bytes, not {ENTROPY_BYTES}",
                entropy.len()
            ));
        }
        Ok(Resumed { now_ms, entropy })
    }
}

// From <linux/random.h>: RNDADDENTROPY is _IOW('R', 0x03, int[2]) and takes
// a struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; };
// RNDRESEEDCRNG is _IO('R', 0x07).
nix::ioctl_write_ptr_bad!(
    rnd_add_entropy,
    nix::request_code_write!(b'R', 0x03, std::mem::size_of::<[i32; 2]>()),
    u8
);
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

/// Reseeds the kernel's generator with `entropy` (module doc).
pub fn reseed_kernel(entropy: &[u8]) -> Result<(), String> {
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("opening /dev/urandom: {e}"))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&urandom);
    // struct rand_pool_info, in the kernel's (native) byte order.
    let bits = i32::try_from(entropy.len() * 8).map_err(|_| "too much entropy")?;
    let len = i32::try_from(entropy.len()).map_err(|_| "too much entropy")?;
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(entropy);
    // SAFETY: `info` is a complete rand_pool_info (a header whose buf_size
    // is the number of bytes that follow it), alive for the whole call; the
    // kernel only reads it. The descriptor is valid for the call.
    unsafe { rnd_add_entropy(fd, info.as_ptr()) }
        .map_err(|e| format!("RNDADDENTROPY (needs CAP_SYS_ADMIN): {e}"))?;
    // SAFETY: RNDRESEEDCRNG takes no argument and touches no user memory;
    // the descriptor is valid for the duration of the call.
    unsafe { rnd_reseed_crng(fd) }
        .map(drop)
        .map_err(|e| format!("RNDRESEEDCRNG (needs Linux >= 5.12 and CAP_SYS_ADMIN): {e}"))
}

/// Sets the realtime clock to `ms` since the Unix epoch.
pub fn set_clock(ms: u64) -> Result<(), String> {
    let now = nix::sys::time::TimeSpec::new((ms / 1000) as i64, ((ms % 1000) * 1_000_000) as i64);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, now)
        .map_err(|e| format!("setting the clock: {e}"))
}

/// Applies a resumed message: reseeds the kernel, then sets the clock.
pub fn apply(msg: &Resumed) -> Result<(), String> {
    reseed_kernel(&msg.entropy)?;
    set_clock(msg.now_ms)
}

/// The realtime clock in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_checked() {
        let ok = serde_json::json!({"now_ms": 5, "entropy": "ab".repeat(32)});
        let m = Resumed::from_json(&ok).unwrap();
        assert_eq!((m.now_ms, m.entropy.len()), (5, 32));
        assert_eq!(hex::encode(&m.entropy[..2]), "abab");
        for (bad, why) in [
            (serde_json::json!({"entropy": "ab".repeat(32)}), "now_ms"),
            (
                serde_json::json!({"now_ms": 1, "entropy": "zz".repeat(32)}),
                "not hex",
            ),
            (serde_json::json!({"now_ms": 1, "entropy": "ab"}), "1 bytes"),
            (serde_json::json!({"now_ms": 1}), "entropy"),
        ] {
            let err = Resumed::from_json(&bad).err().expect("refused");
            assert!(err.contains(why), "{err}");
        }
    }
}
