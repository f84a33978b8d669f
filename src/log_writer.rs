//! Where log lines go: stderr, with `INFO` and quieter lines batched.
//!
//! Every placed order logs a line; written straight to stderr, each line
//! was a `write` system call on the request's own path (and, to a pipe or
//! a journal, a wake-up of the reader). Here `INFO`, `DEBUG` and `TRACE`
//! lines collect in a buffer that a background thread writes out every
//! [`FLUSH_EVERY`], or at once when it holds [`MAX_BUFFERED`] bytes.
//! `WARN` and `ERROR` lines are written at once, after whatever the buffer
//! holds, so lines keep their order and a problem is never waiting in
//! memory. [`flush`] writes the buffer out now: the server calls it before
//! it says it is listening and before it exits, and a panic flushes before
//! its message. A process killed outright loses at most the last
//! [`FLUSH_EVERY`] of `INFO` lines.

use std::{
    io::Write,
    sync::{Mutex, Once},
    time::Duration,
};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How long a batched line may wait.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Past this many buffered bytes, the line's writer flushes at once.
pub const MAX_BUFFERED: usize = 64 * 1024;

/// Lines not yet written.
static BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// Held while writing to stderr, so a flush and a direct line cannot
/// overtake each other.
static STDERR: Mutex<()> = Mutex::new(());

/// Writes every buffered line to stderr now.
pub fn flush() {
    let _writing = STDERR.lock().unwrap_or_else(|e| e.into_inner());
    write_buffered();
}

/// With the stderr lock held: takes the buffer and writes it.
fn write_buffered() {
    let lines = std::mem::take(&mut *BUFFER.lock().unwrap_or_else(|e| e.into_inner()));
    if !lines.is_empty() {
        // nowhere to report a failed log write; the line is dropped, as
        // tracing's own stderr writer would
        let _ = std::io::stderr().write_all(&lines);
    }
}

/// The tracing writer: batches quiet lines, writes loud ones at once.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

impl LogWriter {
    /// Starts the thread that writes the buffer out (once per process).
    pub fn start() -> LogWriter {
        static FLUSHER: Once = Once::new();
        FLUSHER.call_once(|| {
            // a panic's message comes after the lines that led to it
            let report = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                flush();
                report(info);
            }));
            let spawned = std::thread::Builder::new().name("log-flush".into()).spawn(|| loop {
                std::thread::sleep(FLUSH_EVERY);
                flush();
            });
            if spawned.is_err() {
                eprintln!("warning: no log flushing thread; INFO lines are written when the buffer fills");
            }
        });
        LogWriter
    }
}

/// One line on its way out.
pub enum Line {
    Batched,
    Direct,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Line::Batched => {
                let full = {
                    let mut lines = BUFFER.lock().unwrap_or_else(|e| e.into_inner());
                    lines.extend_from_slice(buf);
                    lines.len() >= MAX_BUFFERED
                };
                if full {
                    flush();
                }
                Ok(())
            }
            Line::Direct => {
                let _writing = STDERR.lock().unwrap_or_else(|e| e.into_inner());
                write_buffered();
                std::io::stderr().write_all(buf)
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line::Direct
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        // levels order by verbosity: WARN < INFO
        if *meta.level() > Level::WARN {
            Line::Batched
        } else {
            Line::Direct
        }
    }
}
