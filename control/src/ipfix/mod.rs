//! NAT event logging over IPFIX (RFC 7011 messages, RFC 8158 NAT information elements).
//!
//! Whoever runs SNAT must be able to say which member held which public address and port at a
//! given time. With `--ipfix-collector`, every worker's engine notes each SNAT port allocation
//! and release (and, with `--ipfix-lb-flows`, each load-balancing flow created and removed) in
//! a bounded queue (`xlb_engine::natlog`); the worker moves them, at its next loop iteration,
//! into one bounded channel to this module's thread, which encodes them and sends them over
//! UDP. Nothing of this runs on a worker's packet path; a full queue or channel drops records
//! and counts them lost.
//!
//! Records: one template per address family, sent at start and every
//! [`TEMPLATE_EVERY`] (a UDP collector that starts later learns them then), with
//! `observationTimeMilliseconds` (323), `natEvent` (230: 4 = session create, 5 = session
//! delete; IANA defines no NAT66 values, so IPv6 sessions use the same), `protocolIdentifier`
//! (4), the source address and port as the member (or client) sent them (8/27, 7), after
//! translation (225/281, 227), the destination (12/28, 11) and where it really goes
//! (226/282, 228). For an SNAT flow the source is translated and the destination kept; for a
//! load-balancing flow the other way round.
//!
//! Messages are at most [`MAX_MESSAGE`] bytes (no IP fragments on a 1500-byte path), sent
//! when full or [`FLUSH_EVERY`] after their first record, and never faster than the
//! configured records per second (a token bucket): a backlog waits in the channel, and what
//! the channel cannot hold is lost and counted.

mod record;
#[cfg(test)]
mod tests;

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    sync::{Arc, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use crossbeam::channel::{Receiver, Sender};
use xlb_engine::natlog::{NatEvent, NatLogMode};

use crate::plane::Shared;

pub use record::{
    decode, Decoded, Encoder, NatRecord, MAX_MESSAGE, NAT_SESSION_CREATE, NAT_SESSION_DELETE,
    TEMPLATE_SET, TEMPLATE_V4, TEMPLATE_V6, VERSION,
};

/// A message goes out at most this long after its first record.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Templates are sent again this often.
pub const TEMPLATE_EVERY: Duration = Duration::from_secs(10);
/// Records between the workers and the exporter.
pub const CHANNEL_CAPACITY: usize = 65_536;

/// How the exporter runs.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub collector: SocketAddr,
    /// Most records sent per second.
    pub max_rate: u32,
    pub domain: u32,
}

/// `--ipfix-*`: the export, and which flows the engines log.
#[derive(Clone, Debug)]
pub struct IpfixOptions {
    pub export: ExportOptions,
    /// Load-balancing and inbound NAT flows too, not only SNAT.
    pub lb_flows: bool,
}

impl IpfixOptions {
    /// What the engines note.
    pub fn mode(&self) -> NatLogMode {
        if self.lb_flows {
            NatLogMode::SnatAndInbound
        } else {
            NatLogMode::Snat
        }
    }

    /// ` ipfix=COLLECTOR[+lb_flows]`, for the ready line.
    pub fn describe(&self) -> String {
        format!(
            " ipfix={}{}",
            self.export.collector,
            if self.lb_flows { "+lb_flows" } else { "" }
        )
    }
}

/// Bounded token bucket: `rate` tokens a second, at most a tenth of a second's worth saved
/// (at least one message's worth).
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, now: Instant) -> Bucket {
        let rate = f64::from(rate.max(1));
        let burst = (rate / 10.0).max(40.0);
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.at = now;
    }
    /// How long until one token is there.
    fn wait(&self) -> Duration {
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }
}

/// The exporter's socket and input, bound before the workers start (they take its sender).
#[derive(Debug)]
pub struct Bound {
    opts: ExportOptions,
    socket: UdpSocket,
    tx: Sender<NatEvent>,
    rx: Receiver<NatEvent>,
}

impl Bound {
    /// A UDP socket toward the collector and the bounded channel from the workers.
    pub fn bind(opts: ExportOptions) -> io::Result<Bound> {
        let bind: SocketAddr = if opts.collector.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind)?;
        socket.connect(opts.collector)?;
        let (tx, rx) = crossbeam::channel::bounded(CHANNEL_CAPACITY);
        Ok(Bound {
            opts,
            socket,
            tx,
            rx,
        })
    }

    /// Where the workers put their events (bounded: a full channel is a lost record).
    pub fn sender(&self) -> Sender<NatEvent> {
        self.tx.clone()
    }

    /// Starts the thread; it keeps its figures in `shared.nat_log`. The workers' clock is
    /// `clock` (their `now`), to put wall-clock times on their events.
    pub fn start(self, shared: Arc<Shared>, clock: fn() -> u64) -> io::Result<Exporter> {
        let Bound {
            opts,
            socket,
            tx,
            rx,
        } = self;
        let (stop, stop_rx) = crossbeam::channel::bounded(1);
        *shared
            .nat_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(xlb_api::NatLogStatus {
            collector: opts.collector.to_string(),
            ..Default::default()
        });
        let join = std::thread::Builder::new()
            .name("xlbd-ipfix".into())
            .spawn(move || run(&opts, &socket, &rx, &stop_rx, &shared, clock))?;
        Ok(Exporter {
            _input: tx,
            stop,
            join,
        })
    }
}

/// The running exporter thread.
#[derive(Debug)]
pub struct Exporter {
    /// Keeps the input open while workers come and go: the thread ends on `stop` only.
    _input: Sender<NatEvent>,
    stop: Sender<()>,
    join: JoinHandle<()>,
}

impl Exporter {
    /// Sends what is queued (within the rate, at most 2 s more) and stops.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.join.join();
    }
}

fn run(
    opts: &ExportOptions,
    socket: &UdpSocket,
    rx: &Receiver<NatEvent>,
    stop: &Receiver<()>,
    shared: &Shared,
    clock: fn() -> u64,
) {
    let mut enc = Encoder::new(opts.domain);
    let mut bucket = Bucket::new(opts.max_rate, Instant::now());
    let mut next_templates = Instant::now();
    let mut first_record_at: Option<Instant> = None;
    let mut stopping: Option<Instant> = None;
    let (mut sent, mut messages, mut lost) = (0u64, 0u64, 0u64);
    let send = |enc: &mut Encoder, sent: &mut u64, messages: &mut u64, lost: &mut u64| {
        let (msg, records) = enc.finish(SystemTime::now());
        if msg.is_empty() {
            return;
        }
        match socket.send(&msg) {
            Ok(_) => {
                *sent += records as u64;
                *messages += 1;
            }
            // An unreachable collector (ICMP port unreachable) or a full socket buffer: the
            // records are lost, counted; the next message tries again.
            Err(_) => *lost += records as u64,
        }
        if let Some(s) = shared
            .nat_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            s.records_sent = *sent;
            s.messages_sent = *messages;
            s.records_lost = *lost;
        }
    };
    loop {
        let now = Instant::now();
        if stopping.is_none() && stop.try_recv().is_ok() {
            stopping = Some(now + Duration::from_secs(2));
        }
        if stopping.is_some_and(|t| now >= t) {
            break;
        }
        if now >= next_templates {
            next_templates = now + TEMPLATE_EVERY;
            if enc.pending() > 0 {
                send(&mut enc, &mut sent, &mut messages, &mut lost);
                first_record_at = None;
            }
            enc.add_templates();
            send(&mut enc, &mut sent, &mut messages, &mut lost);
        }
        if first_record_at.is_some_and(|t| now >= t + FLUSH_EVERY) {
            send(&mut enc, &mut sent, &mut messages, &mut lost);
            first_record_at = None;
        }
        bucket.refill(now);
        let wait = bucket.wait();
        if !wait.is_zero() {
            std::thread::sleep(wait.min(FLUSH_EVERY));
            continue;
        }
        // Wake for the flush of the open message, the next templates, or a stop request.
        let wake = first_record_at
            .map_or(next_templates, |t| (t + FLUSH_EVERY).min(next_templates))
            .min(now + Duration::from_millis(50));
        let event = if stopping.is_some() {
            rx.try_recv().ok()
        } else {
            // Timed out, or every worker is gone (the stop request follows).
            rx.recv_deadline(wake).ok()
        };
        match event {
            Some(e) => {
                let r = NatRecord::from_event(&e, clock(), SystemTime::now());
                if !enc.fits(&r) {
                    send(&mut enc, &mut sent, &mut messages, &mut lost);
                    first_record_at = None;
                }
                enc.add(&r);
                first_record_at.get_or_insert(now);
                bucket.tokens -= 1.0;
            }
            None if stopping.is_some() => break,
            None => {}
        }
    }
    send(&mut enc, &mut sent, &mut messages, &mut lost);
    // What could not be sent before the end.
    let left = rx.len() as u64;
    if let Some(s) = shared
        .nat_log
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_mut()
    {
        s.records_lost = lost + left;
    }
}
