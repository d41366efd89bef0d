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
    StompCodec::new(connected, Duration::from_secs(10))
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
    let len = codec.queue_message(&message, message.encoded(WireFormat::Stomp), &mut frames);
    assert_eq!(len, frames.iter().map(Bytes::len).sum::<usize>());
    assert_eq!(frames[1].as_ptr(), message.encoded(WireFormat::Stomp).as_ptr(), "the tail is shared");
    assert_eq!(u16::from_be_bytes([frames[0][2], frames[0][3]]) as usize, len - 4, "the header counts both slices");
    assert_eq!(
        text(&frames),
        "MESSAGE\nsubscription:7\ndestination:/topic/all\nmessage-id:5\nack:5\ncontent-type:application/json\n\
         herald-kind:mail\nherald-ts:t\ncontent-length:7\n\n{\"a\":1}\0"
    );
    assert_eq!(codec.take_auto_ack(), Some(5));
}

#[test]
fn messages_wait_for_their_subscription() {
    let mut codec = codec();
    let message = Message::new(3, Audience::User("u".into()), "", "", "t", Bytes::from_static(b"1"));
    let mut frames = VecDeque::new();
    assert_eq!(codec.queue_message(&message, message.encoded(WireFormat::Stomp), &mut frames), 0);
    assert!(frames.is_empty());
    let subscribe = b"SUBSCRIBE\nid:q\ndestination:/user/queue/inbox\nack:client\nreceipt:r1\n\n\0";
    assert_eq!(codec.decode(subscribe), Ok(Command::Nothing));
    let replies: VecDeque<Bytes> = codec.take_replies().into();
    assert_eq!(replies.len(), 3);
    assert!(text(&replies).starts_with("MESSAGE\nsubscription:q\ndestination:/user/queue/inbox\nmessage-id:3\n"));
    assert_eq!(&replies[2][2..], b"RECEIPT\nreceipt-id:r1\n\n\0");
    assert_eq!(codec.take_auto_ack(), None, "ack:client waits for ACK");
    assert_eq!(codec.decode(b"ACK\nid:3\n\n\0"), Ok(Command::Ack(3)));
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
fn a_topic_is_left_with_its_last_subscription() {
    let mut codec = codec();
    let subscribe = |id: &str| format!("SUBSCRIBE\nid:{id}\ndestination:/topic/news\n\n\0");
    assert!(matches!(codec.decode(subscribe("a").as_bytes()), Ok(Command::Subscribe { .. })));
    assert_eq!(codec.decode(subscribe("b").as_bytes()), Ok(Command::Nothing));
    assert_eq!(codec.decode(b"UNSUBSCRIBE\nid:a\n\n\0"), Ok(Command::Nothing));
    assert_eq!(codec.decode(b"UNSUBSCRIBE\nid:b\n\n\0"), Ok(Command::Unsubscribe { topic: "news".into() }));
    assert!(matches!(codec.decode(b"UNSUBSCRIBE\nid:b\n\n\0"), Err(Refusal::Close(_))));
}
