//! TCP connection tracking, one instance per flow: the flow's state and, per direction, the
//! next sequence number the sender will use (so that RSTs are accepted, RFC 5961).
//! The state diagram and the timeout of each state are in `docs/tcp-states-and-timeouts.md`.
//!
//! ```text
//!  SYN (orig) ──▶ SynSent ── SYN+ACK (reply) ──▶ SynReceived ── ACK (orig) ──▶ Established
//!                                                                                 │ FIN (one way)
//!                       RST (either way, any state) ──▶ Reset                     ▼
//!                                                                              Closing ── FIN (other way) ──▶ Closed
//! ```
//! A flow picked up mid-stream (unknown-flow policy `pickup`) starts in Established.

use crate::wire::tcp_flags::{ACK, FIN, RST, SYN};

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
    /// RST seen.
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

/// Per-flow TCP tracking: 10 bytes, packed to 2-byte alignment so that a flow fits in 80.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, packed(2))]
pub struct TcpTrack {
    pub state: TcpState,
    bits: u8,
    /// Per direction: the sequence number that direction's sender will use next (SYN, FIN and
    /// payload counted). Meaningful once that direction has been seen. Read it by value.
    next_seq: [u32; 2],
}

/// What a segment changed, for the engine's counters and timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    None,
    Established,
    /// FIN both ways.
    Closed,
    /// RST seen.
    Reset,
}

/// `a` is after `b` in sequence space (RFC 1982 serial arithmetic).
pub fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl TcpTrack {
    /// Placeholder for flows that are not TCP.
    pub const NONE: TcpTrack = TcpTrack {
        state: TcpState::Reset,
        bits: 0,
        next_seq: [0; 2],
    };

    /// Tracking for a flow created by a SYN in the original direction.
    pub fn from_syn(seq: u32, payload_len: u16) -> TcpTrack {
        TcpTrack {
            state: TcpState::SynSent,
            bits: SEEN_ORIG,
            next_seq: [seq.wrapping_add(1).wrapping_add(payload_len as u32), 0],
        }
    }

    /// Tracking for a flow picked up mid-stream from a non-SYN segment.
    pub fn picked_up(flags: u8, seq: u32, payload_len: u16) -> TcpTrack {
        let mut t = TcpTrack {
            state: TcpState::Established,
            bits: 0,
            next_seq: [0; 2],
        };
        t.on_segment(ORIG, flags, seq, payload_len);
        t
    }

    /// The sequence number the sender of direction `dir` will use next.
    pub fn next_seq(&self, dir: Dir) -> u32 {
        let seqs = self.next_seq;
        seqs[dir]
    }

    /// Whether the sequence number of `dir` has been learned.
    pub fn seen(&self, dir: Dir) -> bool {
        self.bits & (SEEN_ORIG << dir) != 0
    }

    /// Both next sequence numbers are known and the connection is established: RSTs built from
    /// `next_seq` will be accepted.
    pub fn can_reset(&self) -> bool {
        self.state == TcpState::Established && self.seen(ORIG) && self.seen(REPLY)
    }

    /// Tracks one segment of direction `dir`.
    pub fn on_segment(&mut self, dir: Dir, flags: u8, seq: u32, payload_len: u16) -> Change {
        let end = seq
            .wrapping_add(payload_len as u32)
            .wrapping_add((flags & SYN != 0) as u32)
            .wrapping_add((flags & FIN != 0) as u32);
        if flags & RST == 0 {
            // A keepalive probe (seq = next - 1) or a retransmission never moves this back.
            let mut seqs = self.next_seq;
            if !self.seen(dir) || seq_after(end, seqs[dir]) {
                seqs[dir] = end;
                self.next_seq = seqs;
            }
            self.bits |= SEEN_ORIG << dir;
        }
        if flags & RST != 0 {
            if self.state == TcpState::Reset {
                return Change::None;
            }
            self.state = TcpState::Reset;
            return Change::Reset;
        }
        match self.state {
            TcpState::SynSent if dir == REPLY && flags & (SYN | ACK) == SYN | ACK => {
                self.state = TcpState::SynReceived;
                Change::None
            }
            TcpState::SynReceived if dir == ORIG && flags & ACK != 0 && flags & SYN == 0 => {
                self.state = TcpState::Established;
                self.fin(dir, flags).unwrap_or(Change::Established)
            }
            TcpState::Established | TcpState::Closing => {
                self.fin(dir, flags).unwrap_or(Change::None)
            }
            _ => Change::None,
        }
    }

    fn fin(&mut self, dir: Dir, flags: u8) -> Option<Change> {
        if flags & FIN == 0 {
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

    fn handshake() -> TcpTrack {
        let mut t = TcpTrack::from_syn(1000, 0);
        assert_eq!(t.on_segment(REPLY, SYN | ACK, 5000, 0), Change::None);
        assert_eq!(t.state, TcpState::SynReceived);
        assert_eq!(t.on_segment(ORIG, ACK, 1001, 0), Change::Established);
        t
    }

    #[test]
    fn handshake_tracks_next_seq_both_ways() {
        let t = handshake();
        assert_eq!(t.state, TcpState::Established);
        assert_eq!((t.next_seq(ORIG), t.next_seq(REPLY)), (1001, 5001));
        assert!(t.can_reset());
    }

    #[test]
    fn payload_advances_and_keepalive_does_not_move_back() {
        let mut t = handshake();
        t.on_segment(ORIG, ACK | PSH, 1001, 100);
        assert_eq!(t.next_seq(ORIG), 1101);
        // Linux keepalive probe: seq = SND.NXT - 1, no payload (or one garbage byte).
        t.on_segment(ORIG, ACK, 1100, 0);
        assert_eq!(t.next_seq(ORIG), 1101);
        t.on_segment(ORIG, ACK, 1100, 1);
        assert_eq!(t.next_seq(ORIG), 1101);
        // A retransmission of old data neither.
        t.on_segment(ORIG, ACK, 1001, 50);
        assert_eq!(t.next_seq(ORIG), 1101);
    }

    #[test]
    fn sequence_wraps() {
        let mut t = TcpTrack::from_syn(u32::MAX - 10, 0);
        t.on_segment(REPLY, SYN | ACK, 7, 0);
        t.on_segment(ORIG, ACK, u32::MAX - 9, 0);
        t.on_segment(ORIG, ACK, u32::MAX - 9, 20);
        assert_eq!(t.next_seq(ORIG), 10);
    }

    #[test]
    fn fin_both_ways_closes_and_half_close_is_not_established() {
        let mut t = handshake();
        assert_eq!(t.on_segment(ORIG, FIN | ACK, 1001, 0), Change::None);
        assert_eq!(t.state, TcpState::Closing);
        assert!(!t.can_reset());
        assert_eq!(t.next_seq(ORIG), 1002);
        assert_eq!(t.on_segment(REPLY, FIN | ACK, 5001, 0), Change::Closed);
        assert!(t.state.is_closed());
    }

    #[test]
    fn rst_resets_from_any_state() {
        let mut t = TcpTrack::from_syn(1, 0);
        assert_eq!(t.on_segment(REPLY, RST | ACK, 0, 0), Change::Reset);
        assert_eq!(t.state, TcpState::Reset);
        assert_eq!(t.on_segment(REPLY, RST, 0, 0), Change::None);
    }

    #[test]
    fn half_open_never_resets() {
        let mut t = TcpTrack::from_syn(1, 0);
        assert!(!t.can_reset());
        t.on_segment(REPLY, SYN | ACK, 9, 0);
        assert!(!t.can_reset());
    }

    #[test]
    fn pickup_needs_both_directions_before_reset() {
        let mut t = TcpTrack::picked_up(ACK, 777, 10);
        assert_eq!(t.state, TcpState::Established);
        assert!(!t.can_reset());
        t.on_segment(REPLY, ACK, 4242, 0);
        assert!(t.can_reset());
        assert_eq!((t.next_seq(ORIG), t.next_seq(REPLY)), (787, 4242));
    }
}
