//! Peak resident memory of the server under test (Linux `/proc`). Per scenario the kernel's
//! high-water mark is reset (`echo 5 > /proc/PID/clear_refs`) and read back at the end
//! (`VmHWM`), so each scenario gets its own exact peak; a background task also samples `VmRSS`
//! every 50 ms, which is the fallback where the reset is not allowed (another user's process)
//! and a check on the high-water mark. Nothing here can fail a run: no pid, no number.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A peak, in MiB, and how it was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Peak {
    pub mib: f64,
    /// true: the kernel's VmHWM since the scenario began; false: the largest VmRSS sampled.
    pub exact: bool,
}

/// Reads a `kB` field such as `VmRSS:    12345 kB` from /proc/PID/status text.
pub fn status_field_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn read_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field_kib(&text, field)
}

/// The whole-process high-water mark now (since start or the last reset), in MiB.
pub fn hwm_mib(pid: u32) -> Option<f64> {
    read_kib(pid, "VmHWM").map(|k| k as f64 / 1024.0)
}

/// Watches one process for the length of a scenario.
pub struct RssWatch {
    pid: u32,
    reset_ok: bool,
    max_rss_kib: Arc<AtomicU64>,
    sampler: tokio::task::JoinHandle<()>,
}

impl RssWatch {
    /// Resets the high-water mark (best effort) and starts sampling.
    pub fn start(pid: u32) -> Self {
        let reset_ok = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
        let max_rss_kib = Arc::new(AtomicU64::new(read_kib(pid, "VmRSS").unwrap_or(0)));
        let max = max_rss_kib.clone();
        let sampler = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                match read_kib(pid, "VmRSS") {
                    Some(k) => {
                        max.fetch_max(k, Ordering::Relaxed);
                    }
                    None => break, // the process is gone
                }
            }
        });
        Self {
            pid,
            reset_ok,
            max_rss_kib,
            sampler,
        }
    }

    /// Stops sampling and returns the scenario's peak.
    pub fn finish(self) -> Option<Peak> {
        self.sampler.abort();
        let sampled = self.max_rss_kib.load(Ordering::Relaxed);
        let hwm = read_kib(self.pid, "VmHWM");
        match (self.reset_ok, hwm) {
            (true, Some(h)) => Some(Peak {
                mib: h.max(sampled) as f64 / 1024.0,
                exact: true,
            }),
            _ => (sampled > 0).then(|| Peak {
                mib: sampled as f64 / 1024.0,
                exact: false,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kib_fields_are_read_from_status_text() {
        let s = "Name:\tadapterd\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n";
        assert_eq!(status_field_kib(s, "VmHWM"), Some(204_800));
        assert_eq!(status_field_kib(s, "VmRSS"), Some(102_400));
        assert_eq!(status_field_kib(s, "VmSwap"), None);
        assert_eq!(status_field_kib("VmRSSx: 1 kB", "VmRSS"), None);
    }

    #[tokio::test]
    async fn this_process_has_a_peak_and_a_missing_process_has_none() {
        let w = RssWatch::start(std::process::id());
        let peak = w.finish().expect("own peak");
        assert!(peak.mib > 1.0);
        // Pid 0 never has a /proc entry.
        assert_eq!(RssWatch::start(0).finish(), None);
    }
}
