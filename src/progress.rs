//! Progress of long work (training epochs and iterations, distortion extraction): a bar on a
//! terminal, and when stderr is a file (a Slurm log, `2> log`) a line at least every
//! `BRELU_PROGRESS_INTERVAL` seconds (default 30) with what is done, the rate and the time
//! left, instead of minutes of silence.
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds between progress lines when stderr is not a terminal.
pub const INTERVAL_VAR: &str = "BRELU_PROGRESS_INTERVAL";

fn interval() -> Duration {
    std::env::var(INTERVAL_VAR)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_secs(30), Duration::from_secs_f64)
}

/// A bar of `len` steps labelled `prefix`, counting `unit` (hidden unless `show`): drawn on a
/// terminal, written as a line every [`INTERVAL_VAR`] seconds otherwise.
pub fn bar(show: bool, len: u64, prefix: impl Into<String>, unit: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let (bar, template) = if std::io::stderr().is_terminal() {
        (
            ProgressBar::new(len),
            format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{elapsed_precise}} {{msg}}"),
        )
    } else {
        let lines = ProgressDrawTarget::term_like(Box::new(Lines::new(interval())));
        (
            ProgressBar::with_draw_target(Some(len), lines),
            format!(
                "{{prefix}}: {{pos}}/{{len}} {unit} ({{percent}}%), {{per_sec}}, elapsed \
                 {{elapsed}}, ETA {{eta}} {{msg}}"
            ),
        )
    };
    bar.set_style(
        ProgressStyle::with_template(&template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.into());
    bar
}

/// A draw target that keeps the last frame indicatif renders and writes it to stderr as one
/// line when the interval has passed since the previous line.
#[derive(Debug)]
struct Lines {
    every: Duration,
    state: Mutex<(String, Instant)>,
}

impl Lines {
    fn new(every: Duration) -> Lines {
        Lines {
            every,
            state: Mutex::new((String::new(), Instant::now())),
        }
    }

    fn frame(&self, f: impl FnOnce(&mut String)) -> std::io::Result<()> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s.0);
        Ok(())
    }
}

impl TermLike for Lines {
    fn width(&self) -> u16 {
        200
    }

    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.frame(|f| {
            f.push_str(s);
            f.push(' ');
        })
    }

    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.frame(|f| f.push_str(s.trim_start_matches('\r')))
    }

    fn clear_line(&self) -> std::io::Result<()> {
        self.frame(String::clear)
    }

    fn flush(&self) -> std::io::Result<()> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let line = s.0.trim().to_string();
        if !line.is_empty() && s.1.elapsed() >= self.every {
            eprintln!("{line}");
            s.1 = Instant::now();
        }
        s.0.clear();
        Ok(())
    }
}
