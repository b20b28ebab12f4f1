//! Where log lines go and how they are written.
//!
//! 1. Every line goes to stderr from a thread of its own
//!    (`tracing_appender`'s non-blocking writer), so a slow reader (a
//!    journald pipe) does not stall a worker serving requests until the
//!    queue (128,000 lines) is full; then loggers wait rather than lines
//!    being lost. The [`Guard`] flushes what is queued when dropped at
//!    exit, waiting at most about a second.
//! 2. `RUST_LOG` filters every line (`snapgate=info` by default).
//! 3. Lines are text for people or one JSON object per line for
//!    collectors. Every target but the access log is written by
//!    `tracing_subscriber`'s formatter.
//! 4. The access log (target [`ACCESS`], a line per request) is written by
//!    [`AccessLayer`] in the same two shapes. It is hand-written because it
//!    runs once per request on the serving threads: through
//!    `tracing_subscriber`'s JSON formatter a line of its 15 fields cost
//!    about 29,000 instructions (measured by `scripts/instructions`), most
//!    of them in its generic field visitor and writer adaptor; this layer
//!    writes the same object directly.

use std::io::Write;

use tracing::field::{Field, Visit};
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{filter, fmt, EnvFilter, Layer};

/// The access log's target.
pub const ACCESS: &str = "snapgate::access";

/// Flushes the queued lines when dropped: keep it until exit.
pub struct Guard(#[allow(dead_code)] tracing_appender::non_blocking::WorkerGuard);

/// Sets up logging for the process (module doc): JSON lines if `json`,
/// else text, with colours if `ansi`. Call once.
pub fn init(json: bool, ansi: bool) -> Guard {
    let (stderr, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| "snapgate=info".into());
    // The per-layer filters pass on RUST_LOG's most verbose level, so the
    // process-wide cap (and the `log` crate's, for rustls) stays its.
    let hint = env.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let not_access =
        filter::filter_fn(|m: &Metadata<'_>| m.target() != ACCESS).with_max_level_hint(hint);
    let lines = match json {
        true => fmt::layer().json().with_writer(stderr.clone()).boxed(),
        false => fmt::layer()
            .with_ansi(ansi)
            .with_writer(stderr.clone())
            .boxed(),
    };
    let access = AccessLayer {
        writer: stderr,
        json,
    }
    .with_filter(
        filter::filter_fn(|m: &Metadata<'_>| m.target() == ACCESS).with_max_level_hint(hint),
    );
    tracing_subscriber::registry()
        .with(env)
        .with(lines.with_filter(not_access))
        .with(access)
        .init();
    Guard(guard)
}

/// Writes the access log's lines (module doc, step 4): as JSON, the
/// object `tracing_subscriber` writes for an event outside any span
/// (`timestamp`, `level`, `fields` with `message` first, `target`); as
/// text, the timestamp, level, target and `name=value` pairs, a value
/// quoted only if it has a space, a quote, `=` or `\`.
pub struct AccessLayer<W> {
    /// Where lines go.
    pub writer: W,
    /// JSON, or text.
    pub json: bool,
}

impl<S: Subscriber, W: Write + Clone + 'static> Layer<S> for AccessLayer<W> {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let line = self.line(event);
        let mut writer = self.writer.clone();
        // Nowhere to report a failed log write but the log.
        let _ = writer.write_all(&line);
    }
}

impl<W> AccessLayer<W> {
    /// `event` as one line, its newline included.
    fn line(&self, event: &Event<'_>) -> Vec<u8> {
        let mut line = Vec::with_capacity(512);
        let time = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        let level = event.metadata().level();
        let target = event.metadata().target();
        if self.json {
            let _ = write!(
                line,
                "{{\"timestamp\":\"{time}\",\"level\":\"{level}\",\"fields\":{{"
            );
            event.record(&mut Fields {
                line: &mut line,
                json: true,
                first: true,
            });
            line.extend_from_slice(b"},\"target\":");
            json_str(&mut line, target);
            line.extend_from_slice(b"}\n");
        } else {
            let _ = write!(line, "{time} {level:>5} {target}:");
            event.record(&mut Fields {
                line: &mut line,
                json: false,
                first: true,
            });
            line.push(b'\n');
        }
        line
    }
}

/// Writes an event's fields onto a line.
struct Fields<'a> {
    line: &'a mut Vec<u8>,
    json: bool,
    first: bool,
}

impl Fields<'_> {
    /// Writes the separator and `field`'s name.
    fn name(&mut self, field: &Field) {
        if self.json {
            if !self.first {
                self.line.push(b',');
            }
            json_str(self.line, field.name());
            self.line.push(b':');
        } else {
            self.line.push(b' ');
            if field.name() != "message" {
                self.line.extend_from_slice(field.name().as_bytes());
                self.line.push(b'=');
            }
        }
        self.first = false;
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.name(field);
        if self.json {
            json_str(self.line, value);
        } else if field.name() == "message" || is_bare(value) {
            self.line.extend_from_slice(value.as_bytes());
        } else {
            let _ = write!(self.line, "{value:?}");
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.name(field);
        let _ = write!(self.line, "{value}");
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.name(field);
        let _ = write!(self.line, "{value}");
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.name(field);
        match value.is_finite() {
            true => {
                let _ = write!(self.line, "{value}");
            }
            false => self.line.extend_from_slice(b"null"),
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.name(field);
        let _ = write!(self.line, "{value}");
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        self.record_str(field, &text);
    }
}

/// Whether a text line can show `value` unquoted.
fn is_bare(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'=' && b != b'\\')
}

/// `s` as a JSON string, quoted and escaped (RFC 8259 section 7).
fn json_str(line: &mut Vec<u8>, s: &str) {
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *line, s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(json: bool) -> String {
        let buf = Buf::default();
        let layer = AccessLayer {
            writer: buf.clone(),
            json,
        };
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                target: "snapgate::access",
                host = "a\"b\\c\u{1}.test",
                status = 200u16,
                bytes = 12u64,
                duration_ms = 1.5f64,
                held = false,
                instance = None::<&str>,
                method = %http::Method::GET,
                "access"
            );
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn a_json_line_is_one_object_with_every_field_escaped() {
        let text = logged(true);
        assert!(text.ends_with("}\n") && text.lines().count() == 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["target"], "snapgate::access");
        assert_eq!(v["level"], "INFO");
        let f = &v["fields"];
        assert_eq!(f["message"], "access");
        assert_eq!(f["host"], "a\"b\\c\u{1}.test");
        assert_eq!(
            (f["status"].as_u64(), f["bytes"].as_u64()),
            (Some(200), Some(12))
        );
        assert_eq!(f["duration_ms"], 1.5);
        assert_eq!(f["held"], false);
        assert_eq!(f["method"], "GET");
        assert!(f.get("instance").is_none(), "None is not recorded: {f}");
        assert!(humantime::parse_rfc3339(v["timestamp"].as_str().unwrap()).is_ok());
    }

    #[test]
    fn a_text_line_quotes_what_could_break_it() {
        let text = logged(false);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains(" INFO snapgate::access: access "), "{text}");
        assert!(text.contains("host=\"a\\\"b\\\\c\\u{1}.test\""), "{text}");
        assert!(
            text.contains(" status=200 bytes=12 duration_ms=1.5 held=false method=GET"),
            "{text}"
        );
    }
}
