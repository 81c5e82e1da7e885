//! TCP connection tracking, one instance per flow: the flow's state and, per direction, the
//! next sequence number the sender will use (so that RSTs are accepted, RFC 5961), the largest
//! window that direction advertised and its window scale, so that every segment is checked
//! against the window before it may change anything.
//! The state diagram, the window rule and the timeout of each state are in
//! `docs/tcp-states-and-timeouts.md`.
//!
//! ```text
//!  SYN (orig) ──▶ SynSent ── SYN+ACK (reply) ──▶ SynReceived ── ACK (orig) ──▶ Established
//!                                                                                 │ FIN (one way)
//!                   exact RST (either way) ──▶ Reset                              ▼
//!                                                                              Closing ── FIN (other way) ──▶ Closed
//! ```
//! A flow picked up mid-stream (unknown-flow policy `pickup`) starts in Established.
//!
//! The window rule (after Linux conntrack's `tcp_in_window`, with the RFC 5961 RST rule): a
//! segment of direction `d` is in the window when
//! - it ends no later than `next_seq[d] + max_win[r]` (`r` is the other direction: data never
//!   goes past what the receiver can have allowed, and the receiver can acknowledge nothing
//!   beyond `next_seq[d]`),
//! - it ends no earlier than `next_seq[d] - max_win[r] - 1` (a retransmission is at most one
//!   window old; a keepalive probe, `SND.NXT - 1`, is one byte old),
//! - and, with ACK, its acknowledgement lies in `[next_seq[r] - max(max_win[d], 66000),
//!   next_seq[r]]` (nothing unsent is acknowledged, nothing much older than a window).
//!
//! Only a segment in the window is tracked. An RST in the window ends the flow only when its
//! sequence number is exactly `next_seq[d]`; otherwise it is passed on untracked so that the
//! endpoint can answer with a challenge ACK.

use crate::wire::tcp_flags::{ACK, FIN, RST, SYN, URG};
use crate::wire::{Packet, NO_WSCALE};

/// Direction of a packet within its flow: the creating packet's direction, or the reply.
pub type Dir = usize;
pub const ORIG: Dir = 0;
pub const REPLY: Dir = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TcpState {
    SynSent,
    SynReceived,
    Established,
    /// FIN seen in one direction (half-closed). Not ESTABLISHED: no RST on idle.
    Closing,
    /// FIN seen in both directions.
    Closed,
    /// An exact RST seen.
    Reset,
}

impl TcpState {
    pub fn as_str(self) -> &'static str {
        match self {
            TcpState::SynSent => "syn_sent",
            TcpState::SynReceived => "syn_received",
            TcpState::Established => "established",
            TcpState::Closing => "closing",
            TcpState::Closed => "closed",
            TcpState::Reset => "reset",
        }
    }
    /// Whether the connection is over (the flow only lingers).
    pub fn is_closed(self) -> bool {
        matches!(self, TcpState::Closed | TcpState::Reset)
    }
}

const SEEN_ORIG: u8 = 1;
const FIN_ORIG: u8 = 4;
const FIN_REPLY: u8 = 8;
/// Created mid-stream (unknown-flow policy `pickup`): the window scales were never seen.
const PICKED_UP: u8 = 16;

/// The window shift assumed for a flow picked up mid-stream, whose SYNs were never seen: the
/// largest RFC 7323 allows, so that no real window is underestimated.
pub const PICKUP_WSCALE: u8 = 14;
/// The largest window any receiver can advertise (65 535 << 14, about 1 GiB, a quarter of
/// the sequence space): the receive window assumed for a picked-up flow's direction that has
/// not been seen yet.
pub const MAX_WINDOW: u32 = 0xffff << 14;
/// How far an acknowledgement may trail the peer's next sequence number at least (Linux
/// conntrack's default when no window is known yet).
pub const MIN_ACK_SLACK: u32 = 66_000;
/// Retransmissions of a SYN are accepted up to this far behind the SYN's end (a SYN with
/// data, TCP Fast Open, is retransmitted without it).
const SYN_SLACK: u32 = 0xffff;

/// Bytes of [`TcpTrack::to_record`].
pub const TRACK_RECORD_BYTES: usize = 20;

/// Per-flow TCP tracking: 20 bytes, packed to 2-byte alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, packed(2))]
pub struct TcpTrack {
    pub state: TcpState,
    bits: u8,
    /// Per direction: the shift of that direction's window field (RFC 7323), from its SYN
    /// (`NO_WSCALE` until then; 0 for both when either SYN lacked the option).
    wscale: [u8; 2],
    /// Per direction: the sequence number that direction's sender will use next (SYN, FIN and
    /// payload counted): the highest segment end seen in the window. Meaningful once that
    /// direction has been seen; until the reply is seen, `next_seq[REPLY]` holds the original
    /// SYN's sequence number + 1, the least acknowledgement that answers it. Read it by value.
    next_seq: [u32; 2],
    /// Per direction: the largest window that direction's sender advertised, scaled, at least 1.
    max_win: [u32; 2],
}

/// The fields of a TCP segment that tracking reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// The window field as sent (unscaled).
    pub window: u16,
    /// The window-scale option's shift (SYN only), or `NO_WSCALE`.
    pub wscale: u8,
    pub payload_len: u16,
}

impl Segment {
    pub fn of(pkt: &Packet) -> Segment {
        Segment {
            flags: pkt.tcp_flags,
            seq: pkt.seq,
            ack: pkt.ack,
            window: pkt.window,
            wscale: pkt.wscale,
            payload_len: pkt.payload_len,
        }
    }

    /// The sequence number after this segment (SYN and FIN count one each; an RST nothing).
    pub fn end(&self) -> u32 {
        if self.flags & RST != 0 {
            return self.seq;
        }
        self.seq
            .wrapping_add(self.payload_len as u32)
            .wrapping_add((self.flags & SYN != 0) as u32)
            .wrapping_add((self.flags & FIN != 0) as u32)
    }

    fn is(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// A SYN without ACK or RST: what opens a connection.
    pub fn is_pure_syn(&self) -> bool {
        self.flags & (SYN | ACK | RST) == SYN
    }
}

/// What a segment changed, for the engine's counters and timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    None,
    Established,
    /// FIN both ways.
    Closed,
    /// An exact RST seen.
    Reset,
}

/// What to do with a segment of an existing flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// In the window and tracked: forward it and refresh the flow's idle timer.
    Tracked(Change),
    /// Forwarded, but the flow is left exactly as it was, idle timer included: an RST in the
    /// window that is not exact (the endpoint answers it with a challenge ACK), an RST or a FIN
    /// that may not end a picked-up flow yet, a SYN on a synchronized connection.
    Passed,
    /// Outside the window: nothing changes; the engine drops and counts it (`out_of_window`).
    OutOfWindow,
}

/// `a` is after `b` in sequence space (RFC 1982 serial arithmetic).
pub fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// `a` is `b` or before it in sequence space.
pub fn seq_le(a: u32, b: u32) -> bool {
    !seq_after(a, b)
}

/// Whether a TCP flag combination is one a real stack sends (Linux conntrack's
/// `tcp_valid_flags`; PSH, ECE and CWR are ignored): SYN, SYN+ACK, RST, RST+ACK, FIN+ACK and
/// ACK, each optionally with URG (not RST, not SYN+ACK). Anything else — no flags, SYN+FIN,
/// SYN+RST, FIN without ACK, RST+FIN, ... — is dropped and counted `bad_tcp_flags`.
pub fn valid_flags(flags: u8) -> bool {
    const SYN_URG: u8 = SYN | URG;
    const SYN_ACK: u8 = SYN | ACK;
    const RST_ACK: u8 = RST | ACK;
    const FIN_ACK: u8 = FIN | ACK;
    const FIN_ACK_URG: u8 = FIN | ACK | URG;
    const ACK_URG: u8 = ACK | URG;
    matches!(
        flags & (FIN | SYN | RST | ACK | URG),
        SYN | SYN_URG | SYN_ACK | RST | RST_ACK | FIN_ACK | FIN_ACK_URG | ACK | ACK_URG
    )
}

/// The window a segment advertises, in bytes: SYN windows are never scaled (RFC 7323).
fn window_of(seg: &Segment, shift: u8) -> u32 {
    let w = seg.window as u32;
    let w = if seg.is(SYN) || shift == NO_WSCALE {
        w
    } else {
        w << shift.min(crate::wire::MAX_WSCALE)
    };
    w.max(1)
}

impl TcpTrack {
    /// Placeholder for flows that are not TCP.
    pub const NONE: TcpTrack = TcpTrack {
        state: TcpState::Reset,
        bits: 0,
        wscale: [NO_WSCALE; 2],
        next_seq: [0; 2],
        max_win: [0; 2],
    };

    /// Tracking for a flow created by a SYN in the original direction.
    pub fn from_syn(seg: &Segment) -> TcpTrack {
        TcpTrack {
            state: TcpState::SynSent,
            bits: SEEN_ORIG,
            wscale: [seg.wscale, NO_WSCALE],
            next_seq: [seg.end(), seg.seq.wrapping_add(1)],
            max_win: [window_of(seg, NO_WSCALE), 0],
        }
    }

    /// Tracking for a flow picked up mid-stream from a non-SYN, non-RST segment. Its windows
    /// are learned from its segments, scaled by [`PICKUP_WSCALE`]; until both directions have
    /// been seen, no RST or FIN changes its state.
    pub fn picked_up(seg: &Segment) -> TcpTrack {
        TcpTrack {
            state: TcpState::Established,
            bits: SEEN_ORIG | PICKED_UP,
            wscale: [PICKUP_WSCALE; 2],
            next_seq: [seg.end(), 0],
            max_win: [window_of(seg, PICKUP_WSCALE), 0],
        }
    }

    /// The tracking as the 20 bytes of a flow-store record (`crate::store`): state, bits,
    /// both window scales, then both next sequence numbers and both largest windows, native
    /// byte order.
    pub fn to_record(&self) -> [u8; TRACK_RECORD_BYTES] {
        let (seqs, wins, scales) = (self.next_seq, self.max_win, self.wscale);
        let mut b = [0u8; TRACK_RECORD_BYTES];
        b[0] = self.state as u8;
        b[1] = self.bits;
        b[2..4].copy_from_slice(&scales);
        for d in 0..2 {
            b[4 + 4 * d..8 + 4 * d].copy_from_slice(&seqs[d].to_ne_bytes());
            b[12 + 4 * d..16 + 4 * d].copy_from_slice(&wins[d].to_ne_bytes());
        }
        b
    }

    /// The tracking a record holds, or `None` when its state byte names no state.
    pub fn from_record(b: &[u8; TRACK_RECORD_BYTES]) -> Option<TcpTrack> {
        let state = match b[0] {
            0 => TcpState::SynSent,
            1 => TcpState::SynReceived,
            2 => TcpState::Established,
            3 => TcpState::Closing,
            4 => TcpState::Closed,
            5 => TcpState::Reset,
            _ => return None,
        };
        let word = |at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        Some(TcpTrack {
            state,
            bits: b[1],
            wscale: [b[2], b[3]],
            next_seq: [word(4), word(8)],
            max_win: [word(12), word(16)],
        })
    }

    /// The tracking of a copy of a flow that another node owns (its synced state): the
    /// endpoints may have exchanged more since it was taken, so, as for a picked-up flow, a
    /// segment's acknowledgement may run ahead of what the copy saw by one window.
    pub fn behind(self) -> TcpTrack {
        let mut t = self;
        t.bits |= PICKED_UP;
        t
    }

    /// The sequence number the sender of direction `dir` will use next.
    pub fn next_seq(&self, dir: Dir) -> u32 {
        let seqs = self.next_seq;
        seqs[dir]
    }

    /// The largest window the sender of `dir` advertised (bytes, scaled).
    pub fn max_window(&self, dir: Dir) -> u32 {
        let w = self.max_win;
        w[dir]
    }

    /// The window shift of direction `dir` in use (0 when scaling is off or not known yet).
    pub fn window_scale(&self, dir: Dir) -> u8 {
        let s = self.wscale;
        if s[dir] == NO_WSCALE {
            0
        } else {
            s[dir]
        }
    }

    /// Takes what another forwarder of this flow tracked for direction `dir` (the XDP fast
    /// path, which applies the same window rule to the segments it forwards): the next sequence
    /// number only advances (serial order), the largest window only grows. Nothing changes
    /// for a direction not seen yet.
    pub fn merge(&mut self, dir: Dir, next_seq: u32, max_win: u32) {
        if !self.seen(dir) {
            return;
        }
        let mut seqs = self.next_seq;
        if seq_after(next_seq, seqs[dir]) {
            seqs[dir] = next_seq;
            self.next_seq = seqs;
        }
        let mut w = self.max_win;
        if max_win > w[dir] {
            w[dir] = max_win;
            self.max_win = w;
        }
    }

    /// Whether the sequence number of `dir` has been learned.
    pub fn seen(&self, dir: Dir) -> bool {
        self.bits & (SEEN_ORIG << dir) != 0
    }

    /// Whether the flow was picked up mid-stream.
    pub fn is_picked_up(&self) -> bool {
        self.bits & PICKED_UP != 0
    }

    fn both_seen(&self) -> bool {
        self.seen(ORIG) && self.seen(REPLY)
    }

    /// Both next sequence numbers are known and the connection is established: RSTs built from
    /// `next_seq` will be accepted.
    pub fn can_reset(&self) -> bool {
        self.state == TcpState::Established && self.both_seen()
    }

    /// Whether a segment of `dir` opens a new connection on this flow's tuple, replacing the
    /// flow: a SYN from the original side when the connection is over, or when the handshake
    /// in progress cannot be its (a SYN outside the window: a new attempt, new initial
    /// sequence number).
    pub fn reopens(&self, dir: Dir, seg: &Segment) -> bool {
        if dir != ORIG || !seg.is_pure_syn() {
            return false;
        }
        match self.state {
            TcpState::Closed | TcpState::Reset => true,
            TcpState::SynSent | TcpState::SynReceived => !self.syn_retransmission(seg),
            TcpState::Established | TcpState::Closing => false,
        }
    }

    /// A SYN of the original direction that repeats the one this flow started with.
    fn syn_retransmission(&self, seg: &Segment) -> bool {
        let end = self.next_seq(ORIG);
        !self.is_picked_up()
            && seq_le(seg.seq, end)
            && seq_le(end.wrapping_sub(SYN_SLACK), seg.end())
            && seq_le(seg.end(), end)
    }

    /// Checks one segment of direction `dir` against the window and, when it is in it, tracks
    /// it. Out of the window, or passed untracked, nothing of the flow changes.
    pub fn on_segment(&mut self, dir: Dir, seg: &Segment) -> Outcome {
        if !self.seen(dir) {
            return self.first_of_direction(dir, seg);
        }
        if dir == ORIG && !self.seen(REPLY) && !self.is_picked_up() {
            // SynSent: the client may only repeat its SYN (or give up with an exact RST).
            if seg.is_pure_syn() && self.syn_retransmission(seg) {
                return Outcome::Tracked(Change::None);
            }
            if seg.is(RST) && seg.seq == self.next_seq(ORIG) {
                self.state = TcpState::Reset;
                return Outcome::Tracked(Change::Reset);
            }
            return Outcome::OutOfWindow;
        }
        if seg.is_pure_syn() && matches!(self.state, TcpState::Established | TcpState::Closing) {
            // A SYN on a synchronized connection changes nothing here; the endpoint answers it
            // with a challenge ACK (RFC 5961 §4), which lets a restarted peer recover.
            return Outcome::Passed;
        }
        if !self.in_window(dir, seg) {
            return Outcome::OutOfWindow;
        }
        if seg.is(RST) {
            if seg.seq != self.next_seq(dir) || !self.both_seen() {
                return Outcome::Passed;
            }
            if self.state == TcpState::Reset {
                return Outcome::Tracked(Change::None);
            }
            self.state = TcpState::Reset;
            return Outcome::Tracked(Change::Reset);
        }
        self.advance(dir, seg);
        let change = match self.state {
            TcpState::SynReceived if dir == ORIG && seg.is(ACK) && !seg.is(SYN) => {
                self.state = TcpState::Established;
                self.fin(dir, seg).unwrap_or(Change::Established)
            }
            TcpState::Established | TcpState::Closing => self.fin(dir, seg).unwrap_or(Change::None),
            _ => Change::None,
        };
        Outcome::Tracked(change)
    }

    /// The first segment of a direction not seen yet: the reply to a SYN, or either side of a
    /// picked-up flow.
    fn first_of_direction(&mut self, dir: Dir, seg: &Segment) -> Outcome {
        let other = 1 - dir;
        if self.is_picked_up() {
            if seg.is(RST) {
                // Nothing learned from an RST: it may not end a flow half known.
                return Outcome::Passed;
            }
            let mut learned = *self;
            learned.learn(dir, seg, PICKUP_WSCALE);
            if seg.is(ACK) && !learned.ack_in_window(dir, seg) {
                return Outcome::OutOfWindow;
            }
            // Nor may the FIN of the very segment that completes what is known end it.
            *self = learned;
            return Outcome::Tracked(Change::None);
        }
        if self.state != TcpState::SynSent {
            // The client gave up on the handshake (exact RST): whatever the server still sends
            // is the client's business.
            return Outcome::Passed;
        }
        // SynSent: the reply must answer the SYN (RFC 9293 §3.10.7.3): its ACK acknowledges
        // the SYN (and no more than was sent with it); an RST is acceptable only then.
        let acks_syn = seg.is(ACK)
            && seq_le(self.next_seq(REPLY), seg.ack)
            && seq_le(seg.ack, self.next_seq(other));
        if seg.is(RST) {
            if !acks_syn {
                return Outcome::OutOfWindow;
            }
            self.state = TcpState::Reset;
            return Outcome::Tracked(Change::Reset);
        }
        if seg.flags & (SYN | ACK) != SYN | ACK || !acks_syn {
            return Outcome::OutOfWindow;
        }
        let mut learned = *self;
        learned.learn(dir, seg, seg.wscale);
        let mut s = learned.wscale;
        if s[ORIG] == NO_WSCALE || s[REPLY] == NO_WSCALE {
            // Scaling is in force only when both SYNs carried the option.
            s = [0, 0];
        }
        learned.wscale = s;
        learned.state = TcpState::SynReceived;
        *self = learned;
        Outcome::Tracked(Change::None)
    }

    /// Records the first segment of `dir`.
    fn learn(&mut self, dir: Dir, seg: &Segment, shift: u8) {
        let mut s = self.wscale;
        s[dir] = shift;
        self.wscale = s;
        let mut seqs = self.next_seq;
        seqs[dir] = seg.end();
        self.next_seq = seqs;
        let mut w = self.max_win;
        w[dir] = window_of(seg, shift);
        self.max_win = w;
        self.bits |= SEEN_ORIG << dir;
    }

    /// The receive window of the direction opposite `dir`, as the bound of `dir`'s segments.
    fn receive_window(&self, dir: Dir) -> u32 {
        let other = 1 - dir;
        if self.seen(other) {
            self.max_window(other)
        } else {
            MAX_WINDOW
        }
    }

    /// The window rule for a segment of a direction already seen.
    fn in_window(&self, dir: Dir, seg: &Segment) -> bool {
        let next = self.next_seq(dir);
        let win = self.receive_window(dir);
        let end = seg.end();
        let ahead_ok = seq_le(end, next.wrapping_add(win));
        let behind_ok = seq_le(next.wrapping_sub(win).wrapping_sub(1), end);
        // An RST's acknowledgement means nothing to its receiver (RFC 5961 §3 checks only its
        // sequence number); some stacks even send RST+ACK with an acknowledgement of 0.
        let ack_ok = seg.is(RST) || !seg.is(ACK) || self.ack_in_window(dir, seg);
        ahead_ok && behind_ok && ack_ok
    }

    /// The acknowledgement of a segment of `dir` lies in what the other direction sent. For a
    /// picked-up flow, whose first segment of each direction may have been a retransmission,
    /// it may also run ahead of what was seen by one window.
    fn ack_in_window(&self, dir: Dir, seg: &Segment) -> bool {
        let other = 1 - dir;
        if !self.seen(other) {
            return true;
        }
        let sent = self.next_seq(other);
        let slack = self.max_window(dir).max(MIN_ACK_SLACK);
        let hi = if self.is_picked_up() {
            sent.wrapping_add(slack)
        } else {
            sent
        };
        seq_le(seg.ack, hi) && seq_le(sent.wrapping_sub(slack), seg.ack)
    }

    /// Tracks a segment in the window: the next sequence number only moves forward (a
    /// retransmission or a keepalive probe never moves it back), the largest window only grows.
    fn advance(&mut self, dir: Dir, seg: &Segment) {
        let mut seqs = self.next_seq;
        if seq_after(seg.end(), seqs[dir]) {
            seqs[dir] = seg.end();
            self.next_seq = seqs;
        }
        if seg.is(ACK) || seg.is(SYN) {
            let shift = self.wscale;
            let win = window_of(seg, shift[dir]);
            let mut w = self.max_win;
            if win > w[dir] {
                w[dir] = win;
                self.max_win = w;
            }
        }
    }

    fn fin(&mut self, dir: Dir, seg: &Segment) -> Option<Change> {
        if !seg.is(FIN) || !self.both_seen() {
            return None;
        }
        self.bits |= FIN_ORIG << dir;
        if self.bits & (FIN_ORIG | FIN_REPLY) == FIN_ORIG | FIN_REPLY {
            self.state = TcpState::Closed;
            Some(Change::Closed)
        } else {
            self.state = TcpState::Closing;
            Some(Change::None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tcp_flags::PSH;

    /// A segment with window 64 240 and no window-scale option.
    fn seg(flags: u8, seq: u32, ack: u32, len: u16) -> Segment {
        Segment {
            flags,
            seq,
            ack,
            window: 64_240,
            wscale: NO_WSCALE,
            payload_len: len,
        }
    }

    fn with_window(mut s: Segment, window: u16, wscale: u8) -> Segment {
        s.window = window;
        s.wscale = wscale;
        s
    }

    const C_ISN: u32 = 1000;
    const S_ISN: u32 = 5000;

    fn tracked(t: &mut TcpTrack, dir: Dir, s: Segment) -> Change {
        match t.on_segment(dir, &s) {
            Outcome::Tracked(c) => c,
            other => panic!("{s:?} of {dir}: {other:?}, want tracked"),
        }
    }

    /// Client ISN 1000, server ISN 5000, no window scaling, windows of 64 240.
    fn handshake() -> TcpTrack {
        let mut t = TcpTrack::from_syn(&seg(SYN, C_ISN, 0, 0));
        assert_eq!(
            tracked(&mut t, REPLY, seg(SYN | ACK, S_ISN, C_ISN + 1, 0)),
            Change::None
        );
        assert_eq!(t.state, TcpState::SynReceived);
        assert_eq!(
            tracked(&mut t, ORIG, seg(ACK, C_ISN + 1, S_ISN + 1, 0)),
            Change::Established
        );
        t
    }

    #[test]
    fn handshake_tracks_next_seq_and_windows_both_ways() {
        let t = handshake();
        assert_eq!(t.state, TcpState::Established);
        assert_eq!((t.next_seq(ORIG), t.next_seq(REPLY)), (1001, 5001));
        assert_eq!((t.max_window(ORIG), t.max_window(REPLY)), (64_240, 64_240));
        assert_eq!((t.window_scale(ORIG), t.window_scale(REPLY)), (0, 0));
        assert!(t.can_reset());
    }

    #[test]
    fn payload_advances_and_keepalive_and_retransmissions_do_not_move_back() {
        let mut t = handshake();
        tracked(&mut t, ORIG, seg(ACK | PSH, 1001, 5001, 100));
        assert_eq!(t.next_seq(ORIG), 1101);
        // Linux keepalive probe: seq = SND.NXT - 1, no payload (or one garbage byte).
        tracked(&mut t, ORIG, seg(ACK, 1100, 5001, 0));
        assert_eq!(t.next_seq(ORIG), 1101);
        tracked(&mut t, ORIG, seg(ACK, 1100, 5001, 1));
        assert_eq!(t.next_seq(ORIG), 1101);
        // A retransmission of old data neither.
        tracked(&mut t, ORIG, seg(ACK, 1001, 5001, 50));
        assert_eq!(t.next_seq(ORIG), 1101);
        // Reordering: a later segment first, then the one before it.
        tracked(&mut t, ORIG, seg(ACK, 2101, 5001, 1000));
        tracked(&mut t, ORIG, seg(ACK, 1101, 5001, 1000));
        assert_eq!(t.next_seq(ORIG), 3101);
        // The server's duplicate ACK of the hole (SACK-era loss recovery).
        tracked(&mut t, REPLY, seg(ACK, 5001, 1101, 0));
    }

    #[test]
    fn segments_outside_the_window_change_nothing() {
        let mut t = handshake();
        tracked(&mut t, ORIG, seg(ACK | PSH, 1001, 5001, 100));
        let before = t;
        let next = t.next_seq(ORIG);
        let out = [
            // Far ahead: next + 2^31 - 1, the farthest "after" serial arithmetic knows.
            seg(ACK | PSH, next.wrapping_add((1 << 31) - 1), 5001, 10),
            // Just past the receiver's largest window.
            seg(ACK | PSH, next.wrapping_add(64_240), 5001, 1),
            // More than a window behind.
            seg(ACK | PSH, next.wrapping_sub(64_240 + 100), 5001, 10),
            // Acknowledging what the server never sent, or far too old an acknowledgement.
            seg(ACK, next, 5002, 0),
            seg(ACK, next, 5001u32.wrapping_sub(MIN_ACK_SLACK + 1), 0),
            seg(FIN | ACK, next.wrapping_add(1 << 20), 5001, 0),
            seg(RST, next.wrapping_add(1 << 20), 0, 0),
            seg(RST | ACK, next.wrapping_sub(1 << 20), 5001, 0),
        ];
        for s in out {
            assert_eq!(t.on_segment(ORIG, &s), Outcome::OutOfWindow, "{s:?}");
            assert_eq!(t, before, "{s:?} changed the flow");
        }
        // At the edges: the whole window ahead, exactly one window (plus the probe byte) behind.
        tracked(&mut t, ORIG, seg(ACK, next.wrapping_add(64_239), 5001, 1));
        assert_eq!(t.next_seq(ORIG), next.wrapping_add(64_240));
    }

    #[test]
    fn rst_ends_the_flow_only_when_exact() {
        let mut t = handshake();
        tracked(&mut t, ORIG, seg(ACK | PSH, 1001, 5001, 100));
        let before = t;
        // In the window but not the next sequence number: passed on, nothing changes (the
        // endpoint answers with a challenge ACK).
        for s in [
            seg(RST, 1102, 0, 0),
            seg(RST | ACK, 1100, 5001, 0),
            seg(RST, 1101 + 30_000, 0, 0),
        ] {
            assert_eq!(t.on_segment(ORIG, &s), Outcome::Passed, "{s:?}");
            assert_eq!(t, before);
        }
        assert_eq!(t.on_segment(REPLY, &seg(RST, 5002, 0, 0)), Outcome::Passed);
        // Exact: the flow is reset, whatever the acknowledgement (even a broken 0).
        assert_eq!(
            tracked(&mut t, REPLY, seg(RST | ACK, 5001, 0, 0)),
            Change::Reset
        );
        assert_eq!(t.state, TcpState::Reset);
        assert_eq!(tracked(&mut t, ORIG, seg(RST, 1101, 0, 0)), Change::None);
        assert_eq!(t.next_seq(ORIG), 1101, "RSTs are not counted");
    }

    #[test]
    fn fin_is_checked_against_the_window() {
        let mut t = handshake();
        let before = t;
        assert_eq!(
            t.on_segment(ORIG, &seg(FIN | ACK, 1001 + 100_000, 5001, 0)),
            Outcome::OutOfWindow
        );
        assert_eq!(t, before);
        assert!(
            t.can_reset(),
            "a spoofed FIN does not turn reset on idle off"
        );
        assert_eq!(
            tracked(&mut t, ORIG, seg(FIN | ACK, 1001, 5001, 0)),
            Change::None
        );
        assert_eq!(t.state, TcpState::Closing);
        assert!(!t.can_reset());
        assert_eq!(t.next_seq(ORIG), 1002);
        assert_eq!(
            tracked(&mut t, REPLY, seg(FIN | ACK, 5001, 1002, 0)),
            Change::Closed
        );
        assert!(t.state.is_closed());
    }

    #[test]
    fn reply_in_syn_sent_must_acknowledge_the_syn() {
        let t0 = TcpTrack::from_syn(&seg(SYN, C_ISN, 0, 0));
        for s in [
            seg(SYN | ACK, S_ISN, C_ISN + 2, 0),
            seg(SYN | ACK, S_ISN, C_ISN, 0),
            seg(SYN | ACK, S_ISN, C_ISN.wrapping_sub(100_000), 0),
            seg(ACK, S_ISN, C_ISN + 1, 0),
            seg(SYN, S_ISN, 0, 0),
            seg(RST, 0, 0, 0),
            seg(RST | ACK, 0, C_ISN + 7, 0),
        ] {
            let mut t = t0;
            assert_eq!(t.on_segment(REPLY, &s), Outcome::OutOfWindow, "{s:?}");
            assert_eq!(t, t0);
        }
        // Connection refused: RST+ACK acknowledging the SYN.
        let mut t = t0;
        assert_eq!(
            tracked(&mut t, REPLY, seg(RST | ACK, 0, C_ISN + 1, 0)),
            Change::Reset
        );
        // The client's own segments before the answer: only its SYN again.
        let mut t = t0;
        tracked(&mut t, ORIG, seg(SYN, C_ISN, 0, 0));
        assert_eq!(
            t.on_segment(ORIG, &seg(ACK, C_ISN + 1, 1, 0)),
            Outcome::OutOfWindow
        );
        assert_eq!(t, t0);
        assert!(!t.reopens(ORIG, &seg(SYN, C_ISN, 0, 0)));
        assert!(t.reopens(ORIG, &seg(SYN, 777_777, 0, 0)), "a new attempt");
    }

    #[test]
    fn syn_on_a_synchronized_connection_passes_untracked() {
        let mut t = handshake();
        let before = t;
        assert!(!t.reopens(ORIG, &seg(SYN, 9_999_999, 0, 0)));
        assert_eq!(
            t.on_segment(ORIG, &seg(SYN, 9_999_999, 0, 0)),
            Outcome::Passed
        );
        assert_eq!(t, before);
        // The server's SYN-ACK again (its ACK was lost) is an ordinary retransmission.
        tracked(&mut t, REPLY, seg(SYN | ACK, S_ISN, C_ISN + 1, 0));
        assert_eq!(t, before);
    }

    #[test]
    fn window_scale_applies_only_when_both_syns_carry_it() {
        // Linux: window 64 240 in the SYN (never scaled), shift 7; later windows are << 7.
        let syn = with_window(seg(SYN, C_ISN, 0, 0), 64_240, 7);
        let mut t = TcpTrack::from_syn(&syn);
        let synack = with_window(seg(SYN | ACK, S_ISN, C_ISN + 1, 0), 65_160, 9);
        tracked(&mut t, REPLY, synack);
        assert_eq!((t.window_scale(ORIG), t.window_scale(REPLY)), (7, 9));
        tracked(
            &mut t,
            ORIG,
            with_window(seg(ACK, 1001, 5001, 0), 502, NO_WSCALE),
        );
        assert_eq!(
            t.max_window(ORIG),
            502 << 7,
            "scaled, above the SYN's 64 240"
        );
        tracked(
            &mut t,
            ORIG,
            with_window(seg(ACK, 1001, 5001, 0), 4_000, NO_WSCALE),
        );
        assert_eq!(t.max_window(ORIG), 4_000 << 7);
        tracked(
            &mut t,
            REPLY,
            with_window(seg(ACK, 5001, 1001, 0), 10_000, NO_WSCALE),
        );
        assert_eq!(t.max_window(REPLY), 10_000 << 9);
        // The client may now send up to the server's scaled window: 5 120 000 bytes.
        let far = 1001 + (10_000 << 9) - 1000;
        tracked(&mut t, ORIG, seg(ACK | PSH, far, 5001, 1000));
        assert_eq!(t.next_seq(ORIG), 1001 + (10_000 << 9));
        assert_eq!(
            t.on_segment(ORIG, &seg(ACK | PSH, 1001 + (10_000 << 9) * 2, 5001, 1)),
            Outcome::OutOfWindow
        );

        // Only one side offers the option: no scaling either way.
        let mut t = TcpTrack::from_syn(&syn);
        tracked(
            &mut t,
            REPLY,
            with_window(seg(SYN | ACK, S_ISN, C_ISN + 1, 0), 65_160, NO_WSCALE),
        );
        assert_eq!((t.window_scale(ORIG), t.window_scale(REPLY)), (0, 0));
        tracked(
            &mut t,
            ORIG,
            with_window(seg(ACK, 1001, 5001, 0), 4_000, NO_WSCALE),
        );
        assert_eq!(t.max_window(ORIG), 64_240);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let isn = u32::MAX - 10;
        let mut t = TcpTrack::from_syn(&seg(SYN, isn, 0, 0));
        tracked(&mut t, REPLY, seg(SYN | ACK, 7, isn.wrapping_add(1), 0));
        tracked(&mut t, ORIG, seg(ACK, u32::MAX - 9, 8, 0));
        tracked(&mut t, ORIG, seg(ACK, u32::MAX - 9, 8, 20));
        assert_eq!(t.next_seq(ORIG), 10);
        // Across the wrap: a retransmission before it, a keepalive at 9, an RST at 10.
        tracked(&mut t, ORIG, seg(ACK, u32::MAX - 9, 8, 5));
        tracked(&mut t, ORIG, seg(ACK, 9, 8, 0));
        assert_eq!(t.next_seq(ORIG), 10);
        tracked(&mut t, REPLY, seg(ACK, 8, 10, 0));
        assert_eq!(
            t.on_segment(ORIG, &seg(ACK, 10u32.wrapping_add(1 << 31), 8, 1)),
            Outcome::OutOfWindow
        );
        assert_eq!(tracked(&mut t, ORIG, seg(RST, 10, 0, 0)), Change::Reset);
    }

    #[test]
    fn half_open_never_resets() {
        let mut t = TcpTrack::from_syn(&seg(SYN, 1, 0, 0));
        assert!(!t.can_reset());
        tracked(&mut t, REPLY, seg(SYN | ACK, 9, 2, 0));
        assert!(!t.can_reset());
    }

    #[test]
    fn picked_up_flow_learns_both_directions_before_rst_or_fin_end_it() {
        let mut t = TcpTrack::picked_up(&seg(ACK, 777, 4242, 10));
        assert_eq!(t.state, TcpState::Established);
        assert!(!t.can_reset());
        // The other side is unknown: neither its RST nor the known side's may end the flow.
        assert_eq!(t.on_segment(REPLY, &seg(RST, 4242, 0, 0)), Outcome::Passed);
        assert_eq!(t.on_segment(ORIG, &seg(RST, 787, 0, 0)), Outcome::Passed);
        tracked(&mut t, ORIG, seg(FIN | ACK, 787, 4242, 0));
        assert_eq!(t.state, TcpState::Established, "a FIN neither");
        assert_eq!(t.next_seq(ORIG), 788);
        // Far-ahead data is refused even so (the largest window any receiver can have).
        assert_eq!(
            t.on_segment(ORIG, &seg(ACK, 788u32.wrapping_add((1 << 31) - 1), 4242, 1)),
            Outcome::OutOfWindow
        );
        // The reply must acknowledge something near what the client sent (within the window
        // its own segment advertises, scaled by the assumed 14).
        let far_ack = 788u32.wrapping_add(1 << 31);
        assert_eq!(
            t.on_segment(REPLY, &seg(ACK, 4242, far_ack, 0)),
            Outcome::OutOfWindow
        );
        tracked(&mut t, REPLY, seg(ACK, 4242, 788, 0));
        assert!(t.can_reset());
        assert_eq!((t.next_seq(ORIG), t.next_seq(REPLY)), (788, 4242));
        assert_eq!(t.window_scale(REPLY), PICKUP_WSCALE);
        // Now the exact RST ends it, an inexact one does not.
        assert_eq!(t.on_segment(REPLY, &seg(RST, 4243, 0, 0)), Outcome::Passed);
        assert_eq!(tracked(&mut t, REPLY, seg(RST, 4242, 0, 0)), Change::Reset);
    }

    #[test]
    fn valid_flag_combinations() {
        use crate::wire::tcp_flags::URG;
        for ok in [
            SYN,
            SYN | ACK,
            ACK,
            ACK | PSH,
            FIN | ACK,
            FIN | ACK | PSH,
            RST,
            RST | ACK,
        ] {
            assert!(valid_flags(ok), "{ok:#x}");
            assert!(valid_flags(ok | 0xc0), "ECE and CWR are ignored: {ok:#x}");
        }
        assert!(valid_flags(ACK | URG) && valid_flags(SYN | URG));
        for bad in [
            0,
            PSH,
            URG,
            FIN,
            FIN | PSH | URG,
            SYN | FIN,
            SYN | FIN | ACK,
            SYN | RST,
            SYN | RST | ACK,
            RST | FIN,
            RST | FIN | ACK,
            SYN | ACK | URG,
            FIN | SYN | RST | PSH | ACK | URG,
        ] {
            assert!(!valid_flags(bad), "{bad:#x}");
        }
    }
}
