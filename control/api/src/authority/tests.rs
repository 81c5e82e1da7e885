use super::*;
use loona_hpack::Encoder;

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

fn fields(list: &[(&str, &str)]) -> Fields {
    list.iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn request(path: &str, authority: &str) -> Fields {
    fields(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("authorization", "Bearer t0ken"),
    ])
}

/// Parses what the server would read: frames, with header blocks decoded by a fresh
/// decoder (as the server's own).
#[derive(Debug, PartialEq)]
enum Seen {
    Headers {
        stream: u32,
        flags: u8,
        fields: Fields,
    },
    Other {
        kind: u8,
        stream: u32,
        payload: Vec<u8>,
    },
}

fn server_view(mut bytes: &[u8]) -> Vec<Seen> {
    assert!(bytes.starts_with(PREFACE));
    bytes = &bytes[PREFACE.len()..];
    let mut decoder = Decoder::new();
    let mut seen = Vec::new();
    let mut block: Option<(u32, u8, Vec<u8>)> = None;
    while !bytes.is_empty() {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        assert!(len <= MAX_FRAME, "frame of {len} bytes");
        let (kind, flags) = (bytes[3], bytes[4]);
        let stream = u32::from_be_bytes(bytes[5..9].try_into().unwrap());
        let payload = &bytes[9..9 + len];
        bytes = &bytes[9 + len..];
        match kind {
            TYPE_HEADERS => {
                assert!(block.is_none());
                assert_eq!(flags & FLAG_PADDED, 0);
                let p = if flags & FLAG_PRIORITY != 0 {
                    &payload[5..]
                } else {
                    payload
                };
                block = Some((stream, flags, p.to_vec()));
            }
            TYPE_CONTINUATION => block.as_mut().unwrap().2.extend_from_slice(payload),
            _ => {
                assert!(block.is_none());
                seen.push(Seen::Other {
                    kind,
                    stream,
                    payload: payload.to_vec(),
                });
            }
        }
        if (kind == TYPE_HEADERS || kind == TYPE_CONTINUATION) && flags & FLAG_END_HEADERS != 0 {
            let (stream, flags, b) = block.take().unwrap();
            seen.push(Seen::Headers {
                stream,
                flags: flags & (FLAG_END_STREAM | FLAG_PRIORITY),
                fields: decoder.decode(&b).unwrap(),
            });
        }
    }
    assert!(block.is_none());
    seen
}

/// Feeds `input` in chunks of `chunk` bytes.
fn run(input: &[u8], chunk: usize) -> (Vec<u8>, u64) {
    let mut r = Rewriter::new();
    let mut out = Vec::new();
    for c in input.chunks(chunk.max(1)) {
        r.feed(c, &mut out).unwrap();
    }
    (out, r.replaced())
}

/// A connection as C-core writes it: preface, SETTINGS, two requests with the same
/// authority (the second refers to the first's entries in the dynamic table), DATA.
fn c_core_connection(authority: &str) -> Vec<u8> {
    let mut enc = Encoder::new();
    let mut conn = PREFACE.to_vec();
    conn.extend(frame(0x4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]));
    for (stream, path) in [
        (1u32, "/xlb.v1.Xlb/ListFrontends"),
        (3, "/grpc.health.v1.Health/Check"),
    ] {
        let f = request(path, authority);
        let block = enc.encode(f.iter().map(|(n, v)| (&n[..], &v[..])));
        conn.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, stream, &block));
        conn.extend(frame(0x0, FLAG_END_STREAM, stream, &[0, 0, 0, 0, 0]));
    }
    conn
}

#[test]
fn percent_encoded_socket_path_becomes_localhost_and_the_rest_is_kept() {
    let authority = "%2Frun%2Fxlb%2Fxlbd.sock";
    assert!(http::uri::Authority::try_from(authority).is_err());
    let input = c_core_connection(authority);
    for chunk in [1, 7, 9, 64, input.len()] {
        let (out, replaced) = run(&input, chunk);
        assert_eq!(replaced, 2, "chunk {chunk}");
        let seen = server_view(&out);
        assert_eq!(seen.len(), 5, "{seen:?}");
        assert_eq!(
            seen[0],
            Seen::Other {
                kind: 0x4,
                stream: 0,
                payload: vec![0, 4, 0, 0, 0xff, 0xff]
            }
        );
        for (i, path) in [
            (1, "/xlb.v1.Xlb/ListFrontends"),
            (3, "/grpc.health.v1.Health/Check"),
        ] {
            let stream = if i == 1 { 1 } else { 3 };
            assert_eq!(
                seen[i],
                Seen::Headers {
                    stream,
                    flags: 0,
                    fields: request(path, SUBSTITUTE),
                }
            );
            assert_eq!(
                seen[i + 1],
                Seen::Other {
                    kind: 0,
                    stream,
                    payload: vec![0, 0, 0, 0, 0]
                }
            );
        }
    }
}

#[test]
fn bare_path_and_empty_authorities_are_replaced_valid_ones_kept() {
    for (sent, expect) in [
        ("/run/xlb/xlbd.sock", SUBSTITUTE),
        ("", SUBSTITUTE),
        ("localhost", "localhost"),
        ("198.18.0.1:50051", "198.18.0.1:50051"),
        ("[2001:db8::1]:50051", "[2001:db8::1]:50051"),
    ] {
        let (out, replaced) = run(&c_core_connection(sent), 5);
        assert_eq!(replaced, if sent == expect { 0 } else { 2 }, "{sent:?}");
        let Seen::Headers { fields, .. } = &server_view(&out)[1] else {
            panic!("no headers");
        };
        assert_eq!(
            fields[3],
            (b":authority".to_vec(), expect.as_bytes().to_vec())
        );
    }
}

#[test]
fn padded_prioritized_and_continued_blocks_are_joined_and_large_ones_split() {
    let mut enc = Encoder::new();
    let mut f = request("/xlb.v1.Xlb/GetConfig", "%2Ftmp%2Fs");
    // A block larger than one frame once re-encoded.
    f.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
    let block = enc.encode(f.iter().map(|(n, v)| (&n[..], &v[..])));
    let (a, b) = block.split_at(10);
    let mut headers = vec![3u8]; // pad length
    headers.extend_from_slice(&[0, 0, 0, 0, 15]); // priority
    headers.extend_from_slice(a);
    headers.extend_from_slice(&[0, 0, 0]);
    let (b1, b2) = b.split_at(b.len() / 2);
    let mut input = PREFACE.to_vec();
    input.extend(frame(
        TYPE_HEADERS,
        FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
        5,
        &headers,
    ));
    input.extend(frame(TYPE_CONTINUATION, 0, 5, b1));
    input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 5, b2));
    let (out, replaced) = run(&input, 1000);
    assert_eq!(replaced, 1);
    let seen = server_view(&out);
    let mut want = f.clone();
    want[3].1 = SUBSTITUTE.as_bytes().to_vec();
    assert_eq!(
        seen,
        vec![Seen::Headers {
            stream: 5,
            flags: FLAG_END_STREAM | FLAG_PRIORITY,
            fields: want
        }]
    );
}

#[test]
fn not_http2_passes_through_untouched() {
    let input = b"GET / HTTP/1.1\r\nHost: /x\r\n\r\n";
    assert_eq!(run(input, 3).0, input.to_vec());
    let input = b"PRI * HTTP/1.1 nope";
    assert_eq!(run(input, 1).0, input.to_vec());
}

#[test]
fn protocol_violations_end_the_connection() {
    let mut enc = Encoder::new();
    let block = enc.encode([(&b":authority"[..], &b"x"[..])]);
    let check = |frames: Vec<Vec<u8>>, want: RewriteError| {
        let mut input = PREFACE.to_vec();
        for f in frames {
            input.extend(f);
        }
        let mut out = Vec::new();
        assert_eq!(Rewriter::new().feed(&input, &mut out), Err(want));
    };
    check(
        vec![frame(TYPE_HEADERS, 0, 1, &block), frame(0x0, 0, 1, b"data")],
        RewriteError::Interrupted(1),
    );
    check(
        vec![
            frame(TYPE_HEADERS, 0, 1, &block),
            frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &[]),
        ],
        RewriteError::Interrupted(1),
    );
    check(
        vec![frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block)],
        RewriteError::StrayContinuation,
    );
    check(
        vec![frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_END_HEADERS,
            1,
            &[200, 1],
        )],
        RewriteError::BadHeadersFrame,
    );
    check(
        vec![frame(
            TYPE_HEADERS,
            FLAG_PRIORITY | FLAG_END_HEADERS,
            1,
            &[0, 0],
        )],
        RewriteError::BadHeadersFrame,
    );
    // A reference to a dynamic table entry that does not exist.
    check(
        vec![frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0x80 | 70])],
        RewriteError::Hpack("HeaderIndexOutOfBounds".into()),
    );
    // A table larger than the server allows.
    check(
        vec![frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0x3f, 0xe1, 0x7f, 0x82],
        )],
        RewriteError::Hpack("InvalidMaxDynamicSize".into()),
    );
    let big = vec![0u8; MAX_BLOCK / 2 + 1];
    check(
        vec![
            frame(TYPE_HEADERS, 0, 1, &big),
            frame(TYPE_CONTINUATION, 0, 1, &big),
        ],
        RewriteError::TooLarge,
    );
}

#[test]
fn a_small_block_that_decodes_too_large_is_refused() {
    // Indexed references to one entry of about 4 KB: small on the wire, large decoded.
    let mut enc = Encoder::new();
    let value = vec![b'v'; 4000];
    let first = enc.encode([(&b"x-a"[..], &value[..])]);
    let again = enc.encode([(&b"x-a"[..], &value[..])]);
    let mut block = first;
    for _ in 0..(MAX_BLOCK / 4000) {
        block.extend_from_slice(&again);
    }
    assert!(block.len() < MAX_BLOCK);
    let mut input = PREFACE.to_vec();
    input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
    assert_eq!(
        Rewriter::new().feed(&input, &mut Vec::new()),
        Err(RewriteError::TooLarge)
    );
}

proptest::proptest! {
    #[test]
    fn arbitrary_frames_never_panic(frames in proptest::collection::vec(
        (0u8..12, proptest::num::u8::ANY, 0u32..4, proptest::collection::vec(proptest::num::u8::ANY, 0..64)),
        0..12,
    ), chunk in 1usize..40) {
        let mut input = PREFACE.to_vec();
        for (kind, flags, stream, payload) in &frames {
            input.extend(frame(*kind, *flags, *stream, payload));
        }
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            if r.feed(c, &mut out).is_err() {
                break;
            }
        }
    }
}
