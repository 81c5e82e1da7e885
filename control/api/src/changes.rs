//! The queue of configuration changes received through the API: one thread carries them out one
//! at a time, in the order the server received them, whether or not their client still waits.
//!
//! A gRPC handler's future is dropped when its client hangs up, resets the stream, or passes
//! its deadline. A change must not depend on that: once the server has received a change (its
//! handler ran), the change is queued here and goes through [`crate::ControlState`] to its end,
//! committed or refused (a failed publish rolled back), exactly as if the client had waited;
//! only the answer is lost. And because the queue is FIFO, a client that gave up on one change
//! and sends another finds them applied in the order it sent them, never the older one last.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Mutex, PoisonError};

use tokio::sync::oneshot;
use tonic::Status;

/// Changes waiting at most (received, not yet carried out). More are refused with
/// `RESOURCE_EXHAUSTED`: a client that sends changes and hangs up at once cannot queue work
/// without bound.
pub const CAPACITY: usize = 64;

type Job = Box<dyn FnOnce() + Send>;

/// The queue; its thread starts with the first change and ends when the queue is dropped
/// (after carrying out what was queued).
#[derive(Debug, Default)]
pub struct ChangeQueue {
    sender: Mutex<Option<SyncSender<Job>>>,
}

impl ChangeQueue {
    pub fn new() -> ChangeQueue {
        ChangeQueue::default()
    }

    /// Queues `change` and waits for its result. Dropping the returned future (the client went
    /// away) does not withdraw the change.
    pub async fn run<T: Send + 'static>(
        &self,
        change: impl FnOnce() -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let result = catch_unwind(AssertUnwindSafe(change)).unwrap_or_else(|p| {
                Err(Status::internal(format!(
                    "request handler failed: {}",
                    panic_text(p.as_ref())
                )))
            });
            // Nobody listens when the client went away: the change stands all the same.
            let _ = tx.send(result);
        });
        self.queue(job)?;
        rx.await
            .map_err(|_| Status::internal("the change queue stopped before answering"))?
    }

    fn queue(&self, job: Job) -> Result<(), Status> {
        let mut sender = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
        if sender.is_none() {
            let (tx, rx) = sync_channel::<Job>(CAPACITY);
            std::thread::Builder::new()
                .name("xlb-api-changes".into())
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })
                .map_err(|e| Status::unavailable(format!("cannot start the change thread: {e}")))?;
            *sender = Some(tx);
        }
        let Some(tx) = sender.as_ref() else {
            return Err(Status::unavailable("no change queue"));
        };
        tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => Status::resource_exhausted(format!(
                "{CAPACITY} changes are already queued; try again later"
            )),
            TrySendError::Disconnected(_) => Status::unavailable("the change queue stopped"),
        })
    }
}

fn panic_text(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn changes_run_in_order_even_when_their_callers_leave() {
        let q = Arc::new(ChangeQueue::new());
        let (log_tx, log_rx) = mpsc::channel();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        // The first change waits for the gate; callers of the next two give up at once.
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let first = {
            let q = Arc::clone(&q);
            let log = log_tx.clone();
            tokio::spawn(async move {
                q.run(move || {
                    started_tx.send(()).unwrap();
                    let _ = gate_rx.recv();
                    log.send(1).unwrap();
                    Ok(1)
                })
                .await
            })
        };
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
            .await
            .unwrap();
        for n in [2, 3] {
            let log = log_tx.clone();
            let fut = q.run(move || {
                log.send(n).unwrap();
                Ok(n)
            });
            // Polled once (queued), then dropped: the caller left.
            let _ = tokio::time::timeout(Duration::from_millis(1), fut).await;
        }
        let last = {
            let log = log_tx.clone();
            q.run(move || {
                log.send(4).unwrap();
                Ok(4)
            })
        };
        gate_tx.send(()).unwrap();
        assert_eq!(last.await.unwrap(), 4);
        assert_eq!(first.await.unwrap().unwrap(), 1);
        let order: Vec<i32> = log_rx.try_iter().collect();
        assert_eq!(order, vec![1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn a_panicking_change_fails_alone_and_a_full_queue_refuses() {
        let q = Arc::new(ChangeQueue::new());
        let s = q
            .run(|| -> Result<(), Status> { panic!("boom") })
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::Internal);
        assert!(s.message().contains("boom"), "{s:?}");
        assert_eq!(q.run(|| Ok(7)).await.unwrap(), 7);

        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let held = {
            let q = Arc::clone(&q);
            tokio::spawn(async move {
                q.run(move || {
                    started_tx.send(()).unwrap();
                    let _ = gate_rx.recv();
                    Ok(0)
                })
                .await
            })
        };
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
            .await
            .unwrap();
        // The thread is busy: exactly CAPACITY more are queued (their callers give up after a
        // millisecond; the changes stay queued), the next is refused at once.
        for i in 0..=CAPACITY {
            match tokio::time::timeout(Duration::from_millis(1), q.run(|| Ok(2))).await {
                Err(_elapsed) => assert!(i < CAPACITY, "change {i} was queued"),
                Ok(r) => {
                    assert_eq!(i, CAPACITY, "change {i}: {r:?}");
                    assert_eq!(r.unwrap_err().code(), tonic::Code::ResourceExhausted);
                }
            }
        }
        gate_tx.send(()).unwrap();
        assert_eq!(held.await.unwrap().unwrap(), 0);
    }
}
