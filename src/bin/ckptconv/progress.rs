//! A one-line progress bar on stderr (bytes, rate, ETA), shown only on a terminal.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    total: u64,
    start: Instant,
    last: Option<Instant>,
    enabled: bool,
}

impl Progress {
    pub fn new(total: u64, wanted: bool) -> Progress {
        Progress { total, start: Instant::now(), last: None, enabled: wanted && std::io::stderr().is_terminal() }
    }

    pub fn update(&mut self, done: u64) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self.last.is_some_and(|l| now.duration_since(l) < Duration::from_millis(100)) && done < self.total {
            return;
        }
        self.last = Some(now);
        let secs = now.duration_since(self.start).as_secs_f64().max(1e-6);
        let rate = done as f64 / secs;
        let frac = if self.total == 0 { 1.0 } else { done as f64 / self.total as f64 };
        let eta = if rate > 0.0 { (self.total - done.min(self.total)) as f64 / rate } else { 0.0 };
        let width = 30;
        let filled = ((frac * width as f64) as usize).min(width);
        let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r[{bar}] {:>5.1}%  {:.0}/{:.0} MB  {:.0} MB/s  ETA {:.0}s   ",
            frac * 100.0,
            done as f64 / 1e6,
            self.total as f64 / 1e6,
            rate / 1e6,
            eta
        );
        let _ = err.flush();
    }

    pub fn finish(&mut self) {
        if self.enabled {
            let _ = writeln!(std::io::stderr());
        }
    }
}
