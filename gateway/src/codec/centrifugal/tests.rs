use bytes::Bytes;
use herald_shared::subject::Audience;
use serde_json::{Value, json};

use super::*;

fn codec(subs: Vec<ServerSub>) -> CentrifugalCodec {
    CentrifugalCodec::new("42", "e1".into(), now_secs() + 600, 1, subs, false)
}

fn server_sub(channel: &str, recover_from: Option<u64>) -> ServerSub {
    ServerSub { channel: channel.into(), recover_from, was_recovering: recover_from.is_some() }
}

fn welcome(seq: u64) -> ServerFrame {
    let (conn, user, device, node) = ("c1".into(), "42".into(), "d".into(), "n".into());
    ServerFrame::Welcome { conn, user, device, node, seq, heartbeat: 25, read: 0, unread: 0, epoch: None }
}

fn message(seq: u64, audience: Audience) -> Message {
    Message::new(seq, audience, "", "", "t", Bytes::from(seq.to_string()))
}

/// The JSON objects of a text frame.
fn objects(frame: Bytes) -> Vec<Value> {
    let start = match frame[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let text = std::str::from_utf8(&frame[start..]).unwrap();
    text.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

fn offsets(publications: &Value) -> Vec<u64> {
    publications.as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect()
}

#[test]
fn without_recovery_the_connect_reply_is_the_welcome() {
    let mut codec = codec(vec![server_sub("#42", None), server_sub("all", None)]);
    let reply = objects(codec.notice(&welcome(9)).unwrap()).remove(0);
    assert_eq!(reply["id"], 1);
    assert_eq!(reply["connect"]["client"], "c1");
    assert_eq!(reply["connect"]["subs"]["#42"]["offset"], 9);
    assert_eq!(reply["connect"]["subs"]["all"]["epoch"], "e1");
    assert!(codec.message(&message(10, Audience::All)).is_some());
}

#[test]
fn a_recovering_connect_holds_the_replay_for_its_reply() {
    let mut codec = codec(vec![server_sub("#42", Some(5)), server_sub("all", Some(7))]);
    assert!(codec.notice(&welcome(9)).is_none());
    for (seq, audience) in [(6, Audience::User("42".into())), (7, Audience::All), (8, Audience::All)] {
        assert!(codec.message(&message(seq, audience)).is_none());
    }
    let replayed = ServerFrame::Replayed { from: 6, to: 8, count: 3, complete: true, topic: None };
    let reply = objects(codec.notice(&replayed).unwrap()).remove(0);
    let subs = &reply["connect"]["subs"];
    assert_eq!(offsets(&subs["#42"]["publications"]), vec![6]);
    // 7 was the client's already.
    assert_eq!(offsets(&subs["all"]["publications"]), vec![8]);
    assert_eq!((subs["all"]["recovered"].clone(), subs["all"]["offset"].clone()), (json!(true), json!(9)));
}

#[test]
fn an_incomplete_replay_is_not_recovered_and_its_messages_follow_the_reply() {
    let mut codec = codec(vec![server_sub("#42", Some(5)), server_sub("all", None)]);
    codec.notice(&welcome(9));
    assert!(codec.message(&message(6, Audience::User("42".into()))).is_none());
    let replayed = ServerFrame::Replayed { from: 6, to: 6, count: 1, complete: false, topic: None };
    let frame = objects(codec.notice(&replayed).unwrap());
    assert_eq!(frame[0]["connect"]["subs"]["#42"]["recovered"], false);
    assert_eq!(frame[1]["push"]["channel"], "#42");
    assert_eq!(frame[1]["push"]["pub"]["offset"], 6);
}

#[test]
fn a_topic_subscription_holds_its_messages_until_the_reply() {
    let mut codec = codec(vec![]);
    codec.notice(&welcome(3));
    let commands = codec
        .decode(b"{\"id\":2,\"subscribe\":{\"channel\":\"news\",\"recover\":true,\"offset\":1,\"epoch\":\"e1\"}}\n{}");
    assert_eq!(commands, vec![Ok(Command::Subscribe { topic: "news".into(), since: Some(1) })]);
    assert!(codec.notice(&ServerFrame::Subscribed { topic: "news".into() }).is_none());
    assert!(codec.message(&message(5, Audience::Topic("news".into()))).is_none());
    assert!(codec.message(&message(2, Audience::Topic("news".into()))).is_none());
    assert!(codec.message(&message(6, Audience::All)).is_some());
    let replayed = ServerFrame::Replayed { from: 2, to: 2, count: 1, complete: true, topic: Some("news".into()) };
    let reply = objects(codec.notice(&replayed).unwrap()).remove(0);
    assert_eq!(reply["id"], 2);
    assert_eq!(offsets(&reply["subscribe"]["publications"]), vec![2, 5]);
    assert_eq!(reply["subscribe"]["recovered"], true);
    assert!(codec.message(&message(7, Audience::Topic("news".into()))).is_some());
}

#[test]
fn another_epoch_subscribes_without_recovering() {
    let mut codec = codec(vec![]);
    let commands = codec.decode(br#"{"id":2,"subscribe":{"channel":"news","recover":true,"offset":1,"epoch":"old"}}"#);
    assert_eq!(commands, vec![Ok(Command::Subscribe { topic: "news".into(), since: None })]);
    let reply = objects(codec.notice(&ServerFrame::Subscribed { topic: "news".into() }).unwrap()).remove(0);
    assert_eq!(
        (reply["subscribe"]["was_recovering"].clone(), reply["subscribe"]["recovered"].clone()),
        (json!(true), json!(false))
    );
}

#[test]
fn send_needs_no_id_and_is_ignored() {
    let mut codec = codec(vec![]);
    assert!(codec.decode(br#"{"send":{"data":{}}}"#).is_empty());
    assert!(matches!(&codec.decode(br#"{"rpc":{"method":"x"}}"#)[..], [Err(Refusal::Close(_))]));
}

#[test]
fn the_commands_after_connect_in_its_frame_are_kept_in_either_encoding() {
    assert_eq!(after_first_command(b"{\"id\":1}\n{\"id\":2}\n{}", false).unwrap(), b"{\"id\":2}\n{}");
    assert_eq!(after_first_command(b"{\"id\":1}", false), None);
    let mut message = proto::delimited(b"first");
    message.extend(proto::delimited(b"second"));
    assert_eq!(after_first_command(&message, true).unwrap(), proto::delimited(b"second"));
    assert_eq!(after_first_command(&proto::delimited(b"first"), true).unwrap(), b"");
}

#[test]
fn held_publications_are_spliced_in_whatever_their_payloads_hold() {
    let mut splice = Splice::default();
    // A payload holding what the next list's placeholder is written as.
    let sneaky: Held = [(5, br#"{"data":{"t":"\u0000publications:1"},"offset":5}"#.to_vec())].into();
    let plain: Held = [(6, br#"{"data":1,"offset":6}"#.to_vec())].into();
    let reply = json!({"a": splice.publications(&sneaky, false), "b": splice.publications(&plain, false)});
    let reply: Value = serde_json::from_slice(&splice.into_reply(serde_json::to_vec(&reply).unwrap())).unwrap();
    assert_eq!(reply["a"], json!([{"data": {"t": "\u{0}publications:1"}, "offset": 5}]));
    assert_eq!(reply["b"], json!([{"data": 1, "offset": 6}]));
}
