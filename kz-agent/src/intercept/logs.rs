//! Forwards the eBPF programs' aya-log records (debug diagnostics) to `tracing` via the `log`
//! bridge, on a small thread of its own so loading works with or without a Tokio runtime.
//!
//! Only instances that log at debug level forward (they use the debug program set, see
//! [`super::shared`]). The set's log ring is shared: with several debug instances running at
//! once, each record reaches one of them. Diagnostics only; block events have rings of their own.

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Stops the forwarding thread when dropped (within one poll timeout).
pub struct LogThread {
    stop: Arc<AtomicBool>,
}

impl Drop for LogThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts forwarding the records of the set `program_id` belongs to; `None` when it has no log
/// ring (nothing to forward).
pub fn spawn(program_id: u32) -> Option<LogThread> {
    let mut logger = match aya_log::EbpfLogger::init_from_id(program_id) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!("eBPF log forwarding off: {e}");
            return None;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let spawned = std::thread::Builder::new()
        .name("kz-ebpf-log".into())
        .spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                {
                    let mut fds = [PollFd::new(logger.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(250u16));
                }
                // Flush after a timeout too: the ring is shared, and records an earlier instance
                // left unread keep the kernel from signalling new ones (it wakes a reader only
                // when the reader has caught up).
                logger.flush();
            }
        });
    match spawned {
        Ok(_) => Some(LogThread { stop }),
        Err(e) => {
            tracing::warn!("cannot start the eBPF log thread: {e}");
            None
        }
    }
}
