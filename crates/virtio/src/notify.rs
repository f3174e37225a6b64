//! Queue notifications through eventfds, for processing queues on an event loop.
//!
//! Under KVM each [`EventFd`] is registered as an ioeventfd on the transport's
//! `QueueNotify` register (`slot.base + QUEUE_NOTIFY_OFFSET`, 4 bytes, datamatch = queue
//! index), so a guest notify never leaves the kernel. Under tcg the same eventfds are
//! fed by [`QueueEvents::hook`] from the MMIO write. Either way the event loop watches
//! the descriptors and calls [`QueueEvents::drain`] then
//! [`crate::MmioTransport::process_queue`].

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::QueueNotifyHook;

/// One non-blocking eventfd per queue of a device.
#[derive(Debug)]
pub struct QueueEvents {
    fds: Vec<EventFd>,
}

impl QueueEvents {
    /// Eventfds for a device with `queues` queues.
    pub fn new(queues: usize) -> io::Result<Self> {
        let fds = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self { fds })
    }

    /// Number of queues.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Whether there are no queues.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The eventfd of queue `index` (to register as an ioeventfd or clone).
    pub fn eventfd(&self, index: usize) -> Option<&EventFd> {
        self.fds.get(index)
    }

    /// The raw descriptor of queue `index`, for the event loop.
    pub fn raw_fd(&self, index: usize) -> Option<RawFd> {
        self.fds.get(index).map(AsRawFd::as_raw_fd)
    }

    /// Clears queue `index`'s eventfd; `true` if a notification was pending.
    pub fn drain(&self, index: usize) -> bool {
        self.fds.get(index).is_some_and(|fd| fd.read().is_ok())
    }

    /// A [`QueueNotifyHook`] that signals the eventfd of the notified queue (tcg).
    pub fn hook(self: &Arc<Self>) -> QueueNotifyHook {
        let events = Arc::clone(self);
        Arc::new(move |index| {
            if let Some(fd) = events.fds.get(usize::from(index))
                && let Err(e) = fd.write(1)
            {
                log::warn!("virtio: cannot signal queue {index} eventfd: {e}");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;
    use crate::testutil::*;

    #[test]
    fn hook_signals_eventfd_and_event_loop_processes() {
        let mem = memory();
        let (_, t, _) = transport(Rng::with_source(Box::new(std::io::repeat(7))), &mem);
        let events = Arc::new(QueueEvents::new(1).unwrap());
        assert_eq!(events.len(), 1);
        t.set_notify_hook(Some(events.hook()));
        let mut q = TestQueue::new(&mem, 0, 8);
        bring_up(&t, &[&q]);
        q.add(&[(DATA, 8, true)]);
        assert!(!events.drain(0));
        notify(&t, 0);
        assert_eq!(q.used_idx(), 0, "nothing done on the vCPU thread");
        // The event loop's turn.
        assert!(events.drain(0));
        t.process_queue(0);
        assert_eq!(q.used(0), (0, 8));
        assert!(!events.drain(0));
        assert!(events.raw_fd(0).is_some() && events.raw_fd(1).is_none());
    }
}
