//! The 802.1Q tag of a frame on its way out: kept, changed, removed or added so that the frame
//! carries the tag of the segment it leaves on, and nothing of the one it came from.

use crate::wire::parse::{chunk_mut, ETHERTYPE_VLAN};

/// Room a frame needs after its end to be given a tag.
pub const VLAN_HLEN: usize = 4;

/// Makes the frame `buf[..len]`, which carries the tag `have` (its 12-bit VLAN id, `None`:
/// untagged), leave with the tag `want`, and returns its new length:
/// - same VLAN (or both untagged): unchanged, priority bits included;
/// - another VLAN: the id is rewritten and the priority and DEI bits cleared (they belong
///   to the other segment);
/// - `want` untagged: the tag is removed (the frame gets 4 bytes shorter);
/// - `have` untagged: a tag is inserted after the MAC addresses (priority 0), which needs 4
///   bytes of room in `buf` after `len`.
///
/// `None` when it cannot be done: no room for the tag, or `len` does not describe a frame
/// of that shape. The frame is untouched then.
#[inline]
pub fn retag(buf: &mut [u8], len: usize, have: Option<u16>, want: Option<u16>) -> Option<usize> {
    let (have, want) = (have.map(|v| v & 0x0fff), want.map(|v| v & 0x0fff));
    match (have, want) {
        (None, None) => Some(len),
        (Some(a), Some(b)) if a == b => Some(len),
        (Some(_), Some(b)) => {
            let frame = buf.get_mut(..len)?;
            let tci: &mut [u8; 2] = chunk_mut(frame, 14)?;
            *tci = b.to_be_bytes();
            Some(len)
        }
        (Some(_), None) => {
            let frame = buf.get_mut(..len)?;
            if len < 12 + VLAN_HLEN + 2 {
                return None;
            }
            frame.copy_within(12 + VLAN_HLEN..len, 12);
            Some(len - VLAN_HLEN)
        }
        (None, Some(b)) => {
            let grown = len.checked_add(VLAN_HLEN)?;
            let frame = buf.get_mut(..grown)?;
            if len < 14 {
                return None;
            }
            frame.copy_within(12..len, 12 + VLAN_HLEN);
            let tag: &mut [u8; 4] = chunk_mut(frame, 12)?;
            let [t0, t1] = ETHERTYPE_VLAN.to_be_bytes();
            let [v0, v1] = b.to_be_bytes();
            *tag = [t0, t1, v0, v1];
            Some(grown)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::fixtures::{tcp, Spec};
    use crate::wire::parse;
    use crate::wire::tcp_flags::ACK;

    fn frame(vlan: Option<u16>) -> Vec<u8> {
        Spec::new(false, vlan, tcp(ACK), b"hello").build()
    }

    #[test]
    fn tagging_untagging_and_changing_give_the_frames_etherparse_builds() {
        let untagged = frame(None);
        let v10 = frame(Some(10));
        let v20 = frame(Some(20));
        // Remove.
        let mut f = v10.clone();
        let n = retag(&mut f, v10.len(), Some(10), None).unwrap();
        assert_eq!(&f[..n], &untagged[..]);
        // Insert, with room.
        let mut f = untagged.clone();
        f.resize(untagged.len() + VLAN_HLEN, 0xee);
        let n = retag(&mut f, untagged.len(), None, Some(10)).unwrap();
        assert_eq!(&f[..n], &v10[..]);
        // Change.
        let mut f = v10.clone();
        let n = retag(&mut f, v10.len(), Some(10), Some(20)).unwrap();
        assert_eq!(&f[..n], &v20[..]);
        // Keep (both ways).
        for (fr, v) in [(&untagged, None), (&v10, Some(10))] {
            let mut f = fr.clone();
            assert_eq!(retag(&mut f, fr.len(), v, v), Some(fr.len()));
            assert_eq!(&f, fr);
        }
        // Every result parses with the tag it should carry.
        let mut f = untagged.clone();
        f.extend([0; 4]);
        let n = retag(&mut f, untagged.len(), None, Some(4094)).unwrap();
        assert_eq!(parse(&f[..n]).unwrap().vlan, Some(4094));
    }

    #[test]
    fn priority_bits_stay_within_a_vlan_and_do_not_cross_to_another() {
        let mut f = frame(Some(10));
        f[14] |= 0xa0; // PCP 5
        let same = f.clone();
        assert_eq!(
            retag(&mut f, same.len(), Some(10), Some(10)),
            Some(same.len())
        );
        assert_eq!(f, same);
        retag(&mut f, same.len(), Some(10), Some(30)).unwrap();
        assert_eq!(&f[14..16], &30u16.to_be_bytes());
    }

    #[test]
    fn no_room_or_a_bad_length_leaves_the_frame_alone() {
        let untagged = frame(None);
        let mut f = untagged.clone();
        assert_eq!(retag(&mut f, untagged.len(), None, Some(10)), None);
        assert_eq!(f, untagged);
        assert_eq!(retag(&mut f, untagged.len() + 1, Some(3), None), None);
        assert_eq!(retag(&mut [0u8; 10], 10, Some(3), None), None);
        assert_eq!(retag(&mut [0u8; 17], 13, None, Some(3)), None);
        assert_eq!(retag(&mut [0u8; 8], 8, Some(3), Some(4)), None);
    }
}
