//! Logging: JSON lines (default) or text, filtered by `--log-level`/`RUST_LOG`.
//!
//! Lines go to stderr through a writer thread: a review formats its lines and
//! hands them over, instead of taking the stderr lock and making one write
//! call per line. When stderr stalls (a full pipe to the container runtime)
//! and the queue is full, lines are dropped rather than blocking the worker
//! threads every namespace's reviews run on; each dropped hand-over is
//! counted (`log_lines_dropped_total`), and the response's `warnings` and
//! the `applied-rules` annotation still say what changed.
//!
//! A review's change lines are handed over together ([`batch`]): one queue
//! entry, one wake-up of the writer thread and one write, instead of one of
//! each per line (about ten per restored VM).

use std::cell::RefCell;
use std::io::{BufWriter, Write};
use std::sync::OnceLock;
use std::time::Duration;

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::{FmtSpan, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::settings::LogFormat;

/// Hand-overs (a line, or a review's lines) the writer thread may hold
/// before more are dropped.
const QUEUED_LINES: usize = 16 * 1024;

/// The dropped hand-overs of the installed subscriber's writer.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Log hand-overs dropped because the writer thread's queue was full.
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}

/// The least time between two writes to stderr while lines keep coming.
/// Each write costs the container runtime a read and a log-file write (on
/// the same cores as the API server): at a restore's rate, one write per
/// review cost containerd and its shims about 0.24 ms of CPU per create
/// (`make bench-cluster`, issue 35). Lines wait at most this long; a line
/// after a quiet spell is written at once.
pub const WRITE_LINGER: Duration = Duration::from_millis(50);

/// A sink written in batches: the writer thread flushes whenever its queue
/// runs empty, and after each write waits [`WRITE_LINGER`], so the lines of
/// every review answered meanwhile go out together in its next write.
struct Lingering<W: Write> {
    buffered: BufWriter<W>,
    linger: Duration,
}

impl<W: Write> Lingering<W> {
    fn new(sink: W, linger: Duration) -> Lingering<W> {
        Lingering {
            buffered: BufWriter::with_capacity(64 * 1024, sink),
            linger,
        }
    }
}

impl<W: Write> Write for Lingering<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buffered.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buffered.buffer().is_empty() {
            return Ok(());
        }
        let written = self.buffered.flush();
        if self.linger.is_zero() {
            return written;
        }
        // Only the writer thread sleeps: reviews hand their lines to its
        // queue meanwhile and never wait for it.
        std::thread::sleep(self.linger);
        written
    }
}

/// Installs the global subscriber. `level` is an EnvFilter directive such as
/// `info` or `velero_vm_restore_webhook=debug,kube=warn`; `RUST_LOG` wins.
/// `lossy`: drop lines rather than block when the writer falls behind (the
/// server; a command run by hand keeps every line). Keep the returned guard
/// until exit: dropping it flushes the last lines.
pub fn init(level: &str, format: LogFormat, lossy: bool) -> Option<WorkerGuard> {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (subscriber, guard, dropped) = subscriber(
        level,
        format,
        terminal,
        lossy,
        // A command run by hand writes each line at once.
        Lingering::new(
            std::io::stderr(),
            if lossy { WRITE_LINGER } else { Duration::ZERO },
        ),
    );
    let _ = DROPPED.set(dropped);
    // A second init (tests) keeps the first subscriber.
    tracing::subscriber::set_global_default(subscriber)
        .ok()
        .map(|_| guard)
}

/// The production subscriber, writing to `sink` through the writer thread
/// (the benchmarks give it a file).
pub fn subscriber(
    level: &str,
    format: LogFormat,
    ansi: bool,
    lossy: bool,
    sink: impl Write + Send + 'static,
) -> (
    Box<dyn tracing::Subscriber + Send + Sync>,
    WorkerGuard,
    ErrorCounter,
) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(lossy)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log-writer")
        .finish(sink);
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(BatchingWriter(writer))
        .with_span_events(FmtSpan::NONE);
    let subscriber: Box<dyn tracing::Subscriber + Send + Sync> = match format {
        LogFormat::Json => Box::new(builder.event_format(JsonLines).finish()),
        // Colours only on a terminal: a file or a pipe gets plain text.
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
    };
    (subscriber, guard, dropped)
}

thread_local! {
    /// The lines of the [`batch`] running on this thread, and the writer they
    /// go to (taken from the first line, so any subscriber works).
    static BATCH: RefCell<Option<(Vec<u8>, Option<NonBlocking>)>> = const { RefCell::new(None) };
}

/// Runs `emit`, which logs synchronously, and hands every line it logged to
/// the writer thread at once when it returns (or unwinds). Lines logged on
/// this thread outside a batch go out one by one, as before.
pub fn batch<T>(emit: impl FnOnce() -> T) -> T {
    struct Flush;
    impl Drop for Flush {
        fn drop(&mut self) {
            if let Some((lines, Some(mut writer))) = BATCH.with(|batch| batch.borrow_mut().take())
                && !lines.is_empty()
            {
                // The queue only fails when the writer thread is gone, at exit.
                let _ = writer.write_all(&lines);
            }
        }
    }
    // A nested batch joins the outer one.
    let outer = BATCH.with(|batch| {
        let mut batch = batch.borrow_mut();
        if batch.is_some() {
            true
        } else {
            *batch = Some((Vec::new(), None));
            false
        }
    });
    if outer {
        return emit();
    }
    let _flush = Flush;
    emit()
}

/// The writer thread's queue, joined by [`batch`] when one is running.
struct BatchingWriter(NonBlocking);

struct LineWriter<'a>(&'a NonBlocking);

impl<'a> MakeWriter<'a> for BatchingWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(&self.0)
    }
}

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let batched = BATCH.with(|batch| match batch.borrow_mut().as_mut() {
            Some((lines, writer)) => {
                lines.extend_from_slice(line);
                if writer.is_none() {
                    *writer = Some(self.0.clone());
                }
                true
            }
            None => false,
        });
        if batched {
            Ok(line.len())
        } else {
            self.0.clone().write(line)
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One JSON object per line: `timestamp`, `level`, the event's fields at the
/// top level (`message`, `restore`, `object`, `rule`, ...), and `target`.
/// Written straight into the line buffer, with no map or intermediate value
/// per field. Each line names what it is about, so the enclosing span is not
/// repeated (re-serializing it was most of the cost of a line).
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        writer.write_str("{\"timestamp\":\"")?;
        SystemTime.format_time(&mut writer)?;
        writer.write_str("\",\"level\":\"")?;
        writer.write_str(metadata.level().as_str())?;
        writer.write_char('"')?;
        let mut fields = JsonFields {
            writer: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        write_json_string(&mut writer, metadata.target())?;
        writer.write_str("}\n")
    }
}

struct JsonFields<'a, 'w> {
    writer: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl JsonFields<'_, '_> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        self.writer.write_char(',')?;
        write_json_string(self.writer, field.name())?;
        self.writer.write_char(':')
    }

    fn raw(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|_| self.writer.write_fmt(value));
        }
    }
}

impl Visit for JsonFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_ok() {
            self.result = self
                .key(field)
                .and_then(|_| write_json_string(self.writer, value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity.
        if value.is_finite() {
            self.raw(field, format_args!("{value}"));
        } else {
            self.record_str(field, &value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|_| {
                self.writer.write_char('"')?;
                write!(Escaped(self.writer), "{value:?}")?;
                self.writer.write_char('"')
            });
        }
    }
}

fn write_json_string(writer: &mut impl fmt::Write, text: &str) -> fmt::Result {
    writer.write_char('"')?;
    Escaped(writer).write_str(text)?;
    writer.write_char('"')
}

/// Escapes what it is given as the inside of a JSON string.
struct Escaped<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut start = 0;
        for (index, byte) in text.bytes().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&text[start..index])?;
            if escape.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            start = index + 1;
        }
        self.0.write_str(&text[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    #[test]
    fn lines_logged_while_the_writer_lingers_go_out_in_one_write() {
        let writes = CountedWrites::default();
        let (subscriber, guard, _) = subscriber(
            "info",
            LogFormat::Json,
            false,
            false,
            Lingering::new(writes.clone(), Duration::from_secs(1)),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("first");
            // A line after a quiet spell is written at once...
            let started = Instant::now();
            while writes.0.lock().expect("lock").is_empty() {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "the first line was never written"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            // ...and the writer then waits: these three reach it meanwhile,
            // the last two well after the first (without the wait, the
            // second would be written alone).
            tracing::info!("second");
            std::thread::sleep(Duration::from_millis(150));
            tracing::info!("third");
            tracing::info!("fourth");
        });
        drop(guard);
        let written: Vec<String> = writes
            .0
            .lock()
            .expect("lock")
            .iter()
            .map(|write| String::from_utf8_lossy(write).into_owned())
            .collect();
        assert_eq!(written.len(), 2, "{written:?}");
        assert_eq!(
            (written[0].lines().count(), written[1].lines().count()),
            (1, 3)
        );
        assert!(written[1].contains("\"fourth\""), "{written:?}");
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Counts the writes the writer thread makes, and what they held.
    #[derive(Clone, Default)]
    struct CountedWrites(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for CountedWrites {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").push(buf.to_vec());
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_batch_hands_its_lines_over_in_one_write_and_keeps_every_line() {
        let writes = CountedWrites::default();
        let (subscriber, guard, _) =
            subscriber("info", LogFormat::Json, false, false, writes.clone());
        tracing::subscriber::with_default(subscriber, || {
            batch(|| {
                for index in 0..10 {
                    tracing::info!(index, "change");
                    // A nested batch joins the outer one.
                    batch(|| tracing::info!(index, "nested"));
                }
            });
            tracing::info!("alone");
        });
        drop(guard);
        let writes = writes.0.lock().expect("lock").clone();
        assert_eq!(
            writes.len(),
            2,
            "one write for the batch, one for the line after it"
        );
        let batched = String::from_utf8(writes[0].clone()).expect("utf-8");
        let lines: Vec<serde_json::Value> = batched
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect();
        assert_eq!(lines.len(), 20);
        for (index, line) in lines.chunks(2).enumerate() {
            assert_eq!(line[0]["message"], "change");
            assert_eq!(line[0]["index"], index);
            assert_eq!(line[1]["message"], "nested");
        }
        assert!(String::from_utf8_lossy(&writes[1]).contains("\"alone\""));
    }

    #[test]
    fn a_batch_that_unwinds_still_hands_its_lines_over() {
        let writes = CountedWrites::default();
        let (subscriber, guard, _) =
            subscriber("info", LogFormat::Json, false, false, writes.clone());
        tracing::subscriber::with_default(subscriber, || {
            let unwound = std::panic::catch_unwind(|| {
                batch(|| {
                    tracing::info!("before the panic");
                    panic!("a rule panicked");
                })
            });
            assert!(unwound.is_err());
            tracing::info!("after");
        });
        drop(guard);
        let text: String = writes
            .0
            .lock()
            .expect("lock")
            .iter()
            .map(|write| String::from_utf8_lossy(write).into_owned())
            .collect();
        assert!(text.contains("before the panic"), "{text}");
        assert!(text.contains("\"after\""), "{text}");
    }

    #[test]
    fn json_lines_are_json_with_every_field_escaped() {
        let captured = Captured::default();
        let (subscriber, guard, _) =
            subscriber("info", LogFormat::Json, false, false, captured.clone());
        tracing::subscriber::with_default(subscriber, || {
            let err = "quote \" backslash \\ newline \n bell \u{7} é";
            tracing::info!(
                restore = "r1",
                object = "VirtualMachine prod/web-1",
                dry_run = false,
                waited_ms = 12u64,
                delta = -3i64,
                ratio = 0.5f64,
                error = %err,
                "removed {} ({})",
                "spec.instanceUUID",
                "identity of the original vSphere VM"
            );
            tracing::debug!("filtered out at info");
        });
        drop(guard);
        let text = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
        assert_eq!(line["level"], "INFO");
        assert_eq!(
            line["message"],
            "removed spec.instanceUUID (identity of the original vSphere VM)"
        );
        assert_eq!(line["restore"], "r1");
        assert_eq!(line["object"], "VirtualMachine prod/web-1");
        assert_eq!(line["dry_run"], false);
        assert_eq!(line["waited_ms"], 12);
        assert_eq!(line["delta"], -3);
        assert_eq!(line["ratio"], 0.5);
        assert_eq!(
            line["error"],
            "quote \" backslash \\ newline \n bell \u{7} é"
        );
        assert_eq!(line["target"], module_path!());
        assert!(
            line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    }

    /// A sink that never returns from a write: stderr whose reader stopped.
    struct Stalled(std::sync::mpsc::Receiver<()>);

    impl Write for Stalled {
        fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
            // Blocks until the test ends (its sender is dropped).
            let _ = self.0.recv();
            Err(std::io::Error::other("stalled"))
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_stderr_drops_lines_of_the_server_instead_of_blocking_it() {
        let (hold, stalled) = std::sync::mpsc::channel::<()>();
        let (subscriber, guard, dropped) =
            subscriber("info", LogFormat::Json, false, true, Stalled(stalled));
        let started = std::time::Instant::now();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..(QUEUED_LINES + 1000) {
                tracing::info!(i, "a line");
            }
        });
        // Returned although nothing was written: the queue filled and the
        // rest were counted, not waited for.
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        assert!(
            dropped.dropped_lines() >= 999,
            "{}",
            dropped.dropped_lines()
        );
        drop(hold);
        drop(guard);
    }
}
