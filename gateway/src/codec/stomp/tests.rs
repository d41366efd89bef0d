use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use herald_shared::subject::Audience;

use super::*;
use crate::codec::WireFormat;
use crate::codec::{Command, Refusal};

fn codec() -> StompCodec {
    let connected = Connected {
        version: Version::V12,
        client_sends: Duration::ZERO,
        client_wants: Duration::ZERO,
        allowed_topics: vec!["news".into()],
    };
    StompCodec::new(connected, Duration::from_secs(10), Transport::WebSocket, 64 * 1024)
}

/// The STOMP text of queued frames (WebSocket headers removed: each head starts one).
fn text(frames: &VecDeque<Bytes>) -> String {
    let mut out = String::new();
    for (index, frame) in frames.iter().enumerate() {
        let frame = if index % 2 == 0 { skip_ws_header(frame) } else { &frame[..] };
        out.push_str(std::str::from_utf8(frame).unwrap());
    }
    out
}

fn skip_ws_header(frame: &[u8]) -> &[u8] {
    if frame[1] == 126 { &frame[4..] } else { &frame[2..] }
}

#[test]
fn a_message_is_a_per_socket_head_and_the_shared_tail() {
    let mut codec = codec();
    let subscribe = b"SUBSCRIBE\nid:7\ndestination:/topic/all\n\n\0";
    assert_eq!(codec.decode(subscribe), Ok(Command::Nothing));
    let message = Message::new(5, Audience::All, "mail", "", "t", Bytes::from_static(b"{\"a\":1}"));
    let mut frames = VecDeque::new();
    let len = codec.queue_message(&message, &mut frames);
    assert_eq!(len, frames.iter().map(Bytes::len).sum::<usize>());
    assert_eq!(frames[1].as_ptr(), message.encoded(WireFormat::Stomp).as_ptr(), "the tail is shared");
    assert_eq!(frames[0][1] as usize, len - 2, "the header counts both slices");
    assert_eq!(
        text(&frames),
        "MESSAGE\nsubscription:7\ndestination:/topic/all\nmessage-id:5\ncontent-type:application/json\n\
         herald-kind:mail\n\n{\"a\":1}\0"
    );
    assert_eq!(codec.take_auto_ack(u64::MAX), Some(5));
}

#[test]
fn a_body_with_a_nul_has_its_length() {
    let mut codec = codec();
    assert_eq!(codec.decode(b"SUBSCRIBE\nid:7\ndestination:/topic/all\n\n\0"), Ok(Command::Nothing));
    let message = Message::new(5, Audience::All, "", "id-1", "t", Bytes::from_static(b"a\0b"));
    let mut frames = VecDeque::new();
    codec.queue_message(&message, &mut frames);
    assert_eq!(
        text(&frames),
        "MESSAGE\nsubscription:7\ndestination:/topic/all\nmessage-id:5\ncontent-type:application/json\n\
         herald-id:id-1\ncontent-length:3\n\na\0b\0"
    );
}

#[test]
fn a_subscription_the_client_acknowledges_gets_an_ack_header_in_stomp_1_2() {
    for (version, acked) in [(Version::V12, true), (Version::V11, false)] {
        let mut codec = codec();
        codec.connected.version = version;
        let subscribe = b"SUBSCRIBE\nid:q\ndestination:/user/queue/inbox\nack:client-individual\n\n\0";
        assert_eq!(codec.decode(subscribe), Ok(Command::Nothing));
        let message = Message::new(9, Audience::User("u".into()), "", "", "t", Bytes::from_static(b"1"));
        let mut frames = VecDeque::new();
        codec.queue_message(&message, &mut frames);
        let ack = if acked { "ack:9\n" } else { "" };
        let expected = format!(
            "MESSAGE\nsubscription:q\ndestination:/user/queue/inbox\n{ack}message-id:9\ncontent-type:application/json\n\n1\0"
        );
        assert_eq!(text(&frames), expected, "{version:?}");
        // A burst's shared frame says the same.
        let key = codec.shared_head(&message).unwrap();
        let mut shared = Vec::new();
        append_frame(&mut shared, &key, &message);
        assert_eq!(std::str::from_utf8(skip_ws_header(&shared)).unwrap(), expected);
    }
}

#[test]
fn messages_wait_for_their_subscription() {
    let mut codec = codec();
    let message = Message::new(3, Audience::User("u".into()), "", "", "t", Bytes::from_static(b"1"));
    let mut frames = VecDeque::new();
    assert_eq!(codec.queue_message(&message, &mut frames), 0);
    assert!(frames.is_empty());
    let subscribe = b"SUBSCRIBE\nid:q\ndestination:/user/queue/inbox\nack:client\nreceipt:r1\n\n\0";
    assert_eq!(codec.decode(subscribe), Ok(Command::Nothing));
    let replies: VecDeque<Bytes> = codec.take_replies().into();
    assert_eq!(replies.len(), 3);
    assert!(
        text(&replies).starts_with("MESSAGE\nsubscription:q\ndestination:/user/queue/inbox\nack:3\nmessage-id:3\n")
    );
    assert_eq!(&replies[2][2..], b"RECEIPT\nreceipt-id:r1\n\n\0");
    assert_eq!(codec.take_auto_ack(u64::MAX), None, "ack:client waits for ACK");
    assert_eq!(codec.decode(b"ACK\nid:3\n\n\0"), Ok(Command::Ack(3)));
}

#[test]
fn messages_dropped_before_their_subscription_are_read_again_and_nothing_newer_goes_ahead_of_them() {
    let mut codec = codec();
    let user = |seq: u64| Message::new(seq, Audience::User("u".into()), "", "", "t", Bytes::from_static(b"1"));
    let all = Message::new(1, Audience::All, "", "", "t", Bytes::from_static(b"1"));
    let mut frames = VecDeque::new();
    codec.queue_message(&all, &mut frames);
    // `push.all`'s message and the user's first are dropped for the last 1,024.
    for seq in 2..=1026 {
        codec.queue_message(&user(seq), &mut frames);
    }
    assert!(frames.is_empty());
    let subscribe = b"SUBSCRIBE\nid:q\ndestination:/user/queue/inbox\nreceipt:r1\n\n\0";
    let refill = Command::Refill { audience: Audience::User(String::new()), since: 1 };
    assert_eq!(codec.decode(subscribe), Ok(refill));
    // Only the receipt: the held messages come again with the refill.
    assert_eq!(codec.take_replies().len(), 1);
    // What comes before the refill starts is in its range: not sent now.
    let newer = user(1027);
    assert_eq!(codec.queue_message(&newer, &mut frames), 0);
    assert!(codec.head_of_run(&newer).is_none());
    codec.refill_started(&Audience::User(String::new()));
    assert!(codec.queue_message(&user(2), &mut frames) > 0);
    assert!(text(&frames).contains("message-id:2\n"), "{}", text(&frames));
    // `push.all` keeps its own: its subscription asks for its refill.
    let subscribe = b"SUBSCRIBE\nid:a\ndestination:/topic/all\n\n\0";
    assert_eq!(codec.decode(subscribe), Ok(Command::Refill { audience: Audience::All, since: 0 }));
}

#[test]
fn topics_rpc_and_errors() {
    let mut codec = codec();
    let subscribe = b"SUBSCRIBE\nid:1\ndestination:/topic/news\nherald-since:4\n\n\0";
    assert_eq!(codec.decode(subscribe), Ok(Command::Subscribe { topic: "news".into(), since: Some(4) }));
    let send = b"SEND\ndestination:/app/echo\nreply-to:/topic/news\n\n{\"x\":2}\0";
    let rpc = codec.decode(send).unwrap();
    let Command::Rpc { id, function, data } = rpc else { panic!("{rpc:?}") };
    assert_eq!((function.as_str(), data), ("echo", serde_json::json!({"x": 2})));
    let result = RpcResult { id, ok: true, data: Some(serde_json::json!({"x": 2})), error: None };
    let reply = codec.notice(&ServerFrame::RpcResult(result)).unwrap();
    assert!(
        std::str::from_utf8(&reply[2..]).unwrap().starts_with("MESSAGE\nsubscription:1\ndestination:/topic/news\n")
    );

    let forbidden = codec.decode(b"SUBSCRIBE\nid:2\ndestination:/topic/secret\n\n\0");
    assert!(matches!(forbidden, Err(Refusal::Close(_))));
    let last = codec.close(&Close::new(CloseCode::Policy, "x"));
    assert!(last.starts_with(b"\x81") && last[2..].starts_with(b"ERROR\nmessage:forbidden\n"));
    for bad in
        [&b"SEND\ndestination:/queue/x\n\n\0"[..], b"BEGIN\ntransaction:t\n\n\0", b"DANCE\n\n\0", b"ACK\nid:x\n\n\0"]
    {
        assert!(matches!(codec.decode(bad), Err(Refusal::Close(_))), "{bad:?}");
    }
    assert_eq!(codec.decode(b"\n"), Ok(Command::Nothing));
    assert_eq!(codec.decode(b"DISCONNECT\nreceipt:bye\n\n\0"), Ok(Command::Close));
}

#[test]
fn a_reply_on_a_subscription_the_client_acknowledges_has_an_ack_that_moves_nothing() {
    let mut codec = codec();
    let subscribe = b"SUBSCRIBE\nid:r\ndestination:/user/queue/replies\nack:client\n\n\0";
    assert_eq!(codec.decode(subscribe), Ok(Command::Nothing));
    let send = b"SEND\ndestination:/app/echo\nreply-to:/user/queue/replies\n\n1\0";
    let Ok(Command::Rpc { id, .. }) = codec.decode(send) else { panic!("an rpc") };
    let result = RpcResult { id: id.clone(), ok: true, data: Some(serde_json::json!(1)), error: None };
    let reply = codec.notice(&ServerFrame::RpcResult(result)).unwrap();
    let expected = format!(
        "MESSAGE\nsubscription:r\ndestination:/user/queue/replies\nack:rpc-{id}\nmessage-id:rpc-{id}\n\
         content-type:application/json\ncontent-length:1\n\n1\0"
    );
    assert_eq!(std::str::from_utf8(skip_ws_header(&reply)).unwrap(), expected);
    assert_eq!(codec.decode(format!("ACK\nid:rpc-{id}\n\n\0").as_bytes()), Ok(Command::Nothing));
}

#[test]
fn a_topic_is_left_with_its_last_subscription() {
    let mut codec = codec();
    let subscribe = |id: &str| format!("SUBSCRIBE\nid:{id}\ndestination:/topic/news\n\n\0");
    assert!(matches!(codec.decode(subscribe("a").as_bytes()), Ok(Command::Subscribe { .. })));
    assert_eq!(codec.decode(subscribe("b").as_bytes()), Ok(Command::Nothing));
    assert_eq!(codec.decode(b"UNSUBSCRIBE\nid:a\n\n\0"), Ok(Command::Nothing));
    assert_eq!(codec.decode(b"UNSUBSCRIBE\nid:b\n\n\0"), Ok(Command::Unsubscribe { topic: "news".into() }));
    assert!(matches!(codec.decode(b"UNSUBSCRIBE\nid:b\n\n\0"), Err(Refusal::Close(_))));
}

fn sockjs_codec() -> StompCodec {
    let connected = Connected {
        version: Version::V12,
        client_sends: Duration::ZERO,
        client_wants: Duration::from_secs(10),
        allowed_topics: vec![],
    };
    StompCodec::new(connected, Duration::from_secs(10), Transport::SockJs, 64 * 1024)
}

/// The messages of the SockJS `a[…]` frame in the first WebSocket frame of `bytes`.
fn sockjs_messages(bytes: &[u8]) -> Vec<String> {
    let length = if bytes[1] == 126 { u16::from_be_bytes([bytes[2], bytes[3]]) as usize } else { bytes[1] as usize };
    let payload = &skip_ws_header(bytes)[..length];
    serde_json::from_slice(payload.strip_prefix(b"a").expect("a message frame")).unwrap()
}

#[test]
fn over_sockjs_a_message_is_an_escaped_head_and_tail_in_one_message_frame() {
    let mut codec = sockjs_codec();
    let subscribe = br#"["SUBSCRIBE\nid:sub-0\ndestination:/topic/all\n\n\u0000"]"#;
    assert_eq!(codec.decode_message(subscribe), [Ok(Command::Nothing)]);
    let message = Message::new(5, Audience::All, "mail", "", "t", Bytes::from_static(b"{\"a\":\"\\n\"}"));
    let mut frames = VecDeque::new();
    codec.queue_message(&message, &mut frames);
    let whole: Vec<u8> = frames.iter().flat_map(|frame| frame.iter().copied()).collect();
    assert_eq!(skip_ws_header(&whole).len(), u16::from_be_bytes([whole[2], whole[3]]) as usize, "one WebSocket frame");
    let expected = "MESSAGE\nsubscription:sub-0\ndestination:/topic/all\nmessage-id:5\n\
                    content-type:application/json\nherald-kind:mail\n\n{\"a\":\"\\n\"}\0";
    assert_eq!(sockjs_messages(&whole), [expected]);
    assert_eq!(frames[1].as_ptr(), message.encoded(WireFormat::StompSockJs).as_ptr(), "the tail is shared");
    assert_eq!(sockjs_messages(&codec.ping()), ["\n"], "a client that wants heart-beats gets STOMP's");
}

#[test]
fn over_sockjs_the_ack_header_is_escaped_with_the_head() {
    let mut codec = sockjs_codec();
    let subscribe = br#"["SUBSCRIBE\nid:q\ndestination:/user/queue/a\nack:client\n\n\u0000"]"#;
    assert_eq!(codec.decode_message(subscribe), [Ok(Command::Nothing)]);
    let message = Message::new(12, Audience::User("u".into()), "", "", "t", Bytes::from_static(b"{}"));
    let expected = "MESSAGE\nsubscription:q\ndestination:/user/queue/a\nack:12\nmessage-id:12\n\
                    content-type:application/json\n\n{}\0";
    let mut frames = VecDeque::new();
    codec.queue_message(&message, &mut frames);
    let whole: Vec<u8> = frames.iter().flat_map(|frame| frame.iter().copied()).collect();
    assert_eq!(sockjs_messages(&whole), [expected]);
    let key = codec.shared_head(&message).unwrap();
    let mut shared = Vec::new();
    append_frame(&mut shared, &key, &message);
    assert_eq!(sockjs_messages(&shared), [expected]);
}

#[test]
fn over_sockjs_each_message_of_a_client_frame_is_read_and_bad_framing_closes() {
    let mut codec = sockjs_codec();
    let two = br#"["SUBSCRIBE\nid:1\ndestination:/user/queue/a\nreceipt:r1\n\n\u0000","\n"]"#;
    assert_eq!(codec.decode_message(two), [Ok(Command::Nothing)], "a heart-beat is no command");
    assert_eq!(sockjs_messages(&codec.take_replies()[0]), ["RECEIPT\nreceipt-id:r1\n\n\0"]);
    let decoded = codec.decode_message(b"SUBSCRIBE\nid:2\n\n\0");
    assert!(matches!(&decoded[..], [Err(Refusal::Close(_))]), "{decoded:?}");
    let close = codec.close(&Close::new(CloseCode::Policy, "bad_request"));
    let error = sockjs_messages(&close);
    assert!(error[0].starts_with("ERROR\nmessage:bad_request\n"), "{error:?}");
    let text = String::from_utf8_lossy(&close);
    assert!(text.contains("c[1008,\""), "SockJS's close frame follows: {text:?}");
}

#[test]
fn frames_split_over_messages_or_several_in_one_are_read_as_a_stream() {
    let mut codec = codec();
    // stomp.js 2 sends frames over 16 KiB in 16 KiB pieces.
    let body = format!("{{\"text\":\"{}\"}}", "x".repeat(40_000));
    let send = format!("SEND\ndestination:/app/echo\ncontent-length:{}\n\n{body}\0", body.len());
    let pieces: Vec<&[u8]> = send.as_bytes().chunks(16 * 1024).collect();
    assert_eq!(pieces.len(), 3);
    assert_eq!(codec.decode_message(pieces[0]), []);
    assert_eq!(codec.decode_message(pieces[1]), []);
    let rpc = codec.decode_message(pieces[2]);
    let [Ok(Command::Rpc { function, data, .. })] = &rpc[..] else { panic!("{rpc:?}") };
    assert_eq!((function.as_str(), data["text"].as_str().map(str::len)), ("echo", Some(40_000)));

    let two = b"ACK\nid:3\n\n\0\nACK\nid:4\n\n\0\nACK\nid:";
    assert_eq!(codec.decode_message(two), [Ok(Command::Ack(3)), Ok(Command::Ack(4))]);
    assert_eq!(codec.decode_message(b"5\n\n\0"), [Ok(Command::Ack(5))], "the kept start of a frame");
    // Nothing is read after a DISCONNECT: its RECEIPT is the last frame.
    let after = codec.decode_message(b"DISCONNECT\nreceipt:bye\n\n\0DANCE\n\n\0");
    assert_eq!(after, [Ok(Command::Close)]);
    let last = codec.close(&Close::client_left("bye"));
    assert!(last[2..].starts_with(b"RECEIPT\nreceipt-id:bye\n"), "{last:?}");
}

#[test]
fn a_frame_past_the_limit_is_refused_whole_or_in_pieces() {
    let connected = || Connected {
        version: Version::V12,
        client_sends: Duration::ZERO,
        client_wants: Duration::ZERO,
        allowed_topics: vec![],
    };
    let send = format!("SEND\ndestination:/app/echo\n\n{}\0", "x".repeat(200));
    let mut whole = StompCodec::new(connected(), Duration::ZERO, Transport::WebSocket, 100);
    assert!(matches!(&whole.decode_message(send.as_bytes())[..], [Err(Refusal::Close(_))]));
    let mut pieces = StompCodec::new(connected(), Duration::ZERO, Transport::WebSocket, 100);
    assert_eq!(pieces.decode_message(&send.as_bytes()[..90]), []);
    assert!(matches!(&pieces.decode_message(&send.as_bytes()[90..120])[..], [Err(Refusal::Close(_))]));
    let error = String::from_utf8_lossy(&pieces.close(&Close::new(CloseCode::Policy, "x"))).to_string();
    assert!(error.contains("a frame longer than 100 bytes"), "{error}");
}

#[test]
fn a_client_that_sends_no_heart_beats_is_also_pinged() {
    let ping = crate::websocket::frame::ping();
    let cases = [
        // (transport, client sends, client wants): what the heartbeat is
        (Transport::WebSocket, 0, 0, vec![ping.to_vec()]),
        (Transport::WebSocket, 1, 1, vec![b"\x81\x01\n".to_vec()]),
        (Transport::WebSocket, 0, 1, vec![b"\x81\x01\n".to_vec(), ping.to_vec()]),
        (Transport::SockJs, 0, 0, vec![b"\x81\x01h".to_vec(), ping.to_vec()]),
        (Transport::SockJs, 1, 0, vec![b"\x81\x01h".to_vec()]),
        (Transport::SockJs, 1, 1, vec![b"\x81\x07a[\"\\n\"]".to_vec()]),
    ];
    for (transport, sends, wants, expected) in cases {
        let connected = Connected {
            version: Version::V12,
            client_sends: Duration::from_secs(sends),
            client_wants: Duration::from_secs(wants),
            allowed_topics: vec![],
        };
        let codec = StompCodec::new(connected, Duration::from_secs(10), transport, 1024);
        assert_eq!(codec.ping().to_vec(), expected.concat(), "{transport:?} {sends},{wants}");
    }
}

#[test]
fn over_sockjs_a_body_that_is_not_utf8_goes_as_text() {
    let mut codec = sockjs_codec();
    let subscribe = br#"["SUBSCRIBE\nid:q\ndestination:/user/queue/q\n\n\u0000"]"#;
    assert_eq!(codec.decode_message(subscribe), [Ok(Command::Nothing)]);
    let message = Message::new(9, Audience::User("u".into()), "", "", "t", Bytes::from_static(b"ab\xffcd"));
    let mut frames = VecDeque::new();
    codec.queue_message(&message, &mut frames);
    let whole: Vec<u8> = frames.iter().flat_map(|frame| frame.iter().copied()).collect();
    let frame = &sockjs_messages(&whole)[0];
    assert!(frame.ends_with("application/json\n\nab\u{fffd}cd\0"), "{frame:?}");
}

#[test]
fn a_receipt_waits_for_the_answer_to_an_earlier_topic_frame() {
    let mut codec = codec();
    let topic = Command::Subscribe { topic: "news".into(), since: None };
    assert_eq!(codec.decode(b"SUBSCRIBE\nid:n\ndestination:/topic/news\nreceipt:r1\n\n\0"), Ok(topic));
    assert_eq!(codec.decode(b"SUBSCRIBE\nid:q\ndestination:/user/queue/x\nreceipt:r2\n\n\0"), Ok(Command::Nothing));
    assert!(codec.take_replies().is_empty(), "r2 waits for r1");
    assert_eq!(codec.notice(&ServerFrame::Subscribed { topic: "news".into() }), None);
    let receipts: Vec<Bytes> = codec.take_replies();
    let receipts: Vec<&[u8]> = receipts.iter().map(|frame| skip_ws_header(frame)).collect();
    assert_eq!(receipts, [&b"RECEIPT\nreceipt-id:r1\n\n\0"[..], &b"RECEIPT\nreceipt-id:r2\n\n\0"[..]]);
    // With nothing awaited, a receipt goes at once.
    assert_eq!(codec.decode(b"ACK\nid:3\nreceipt:r3\n\n\0"), Ok(Command::Ack(3)));
    assert_eq!(codec.take_replies().len(), 1);
}
