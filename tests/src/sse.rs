//! A Server-Sent Events test client (reqwest, and an event parser of its own per the HTML spec's
//! "event stream interpretation").

use crate::ws::FRAME_TIMEOUT;

/// One dispatched event, or a comment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    /// `message` when the stream names none.
    pub event: String,
    /// The `data` lines joined with `\n`.
    pub data: String,
    pub retry: Option<u64>,
    /// A comment line (a heart-beat), not an event.
    pub comment: bool,
}

pub struct SseClient {
    response: reqwest::Response,
    buffer: String,
}

impl SseClient {
    /// Opens `url` with `headers`; an HTTP refusal comes back as its status and JSON body.
    pub async fn open(url: &str, headers: &[(&str, &str)]) -> Result<SseClient, (u16, serde_json::Value)> {
        let mut request = reqwest::Client::new().get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("GET /sse");
        if response.status() != 200 {
            let status = response.status().as_u16();
            return Err((status, response.json().await.unwrap_or(serde_json::Value::Null)));
        }
        let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
        assert_eq!(content_type, "text/event-stream");
        Ok(SseClient { response, buffer: String::new() })
    }

    /// A header of the response, if it has it.
    pub fn header(&self, name: &str) -> Option<String> {
        Some(self.response.headers().get(name)?.to_str().ok()?.to_string())
    }

    /// The next event or comment; `None` when the stream ended. Panics after [`FRAME_TIMEOUT`].
    pub async fn next(&mut self) -> Option<SseEvent> {
        tokio::time::timeout(FRAME_TIMEOUT, self.read()).await.expect("nothing from the gateway in time")
    }

    /// The next event (comments skipped); panics when the stream ends.
    pub async fn next_event(&mut self) -> SseEvent {
        loop {
            match self.next().await {
                Some(event) if event.comment => continue,
                Some(event) => return event,
                None => panic!("the stream ended while an event was expected"),
            }
        }
    }

    async fn read(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.parse() {
                return Some(event);
            }
            let chunk = self.response.chunk().await.ok()??;
            self.buffer.push_str(std::str::from_utf8(&chunk).expect("UTF-8 events"));
        }
    }

    /// Takes one complete event (up to a blank line) or comment from the buffer.
    fn parse(&mut self) -> Option<SseEvent> {
        let mut event = SseEvent { event: "message".into(), ..SseEvent::default() };
        let mut data: Vec<String> = Vec::new();
        let mut found = None;
        let mut fields = 0;
        let mut consumed = 0;
        for line in self.buffer.split_inclusive('\n') {
            if !line.ends_with('\n') {
                return None;
            }
            consumed += line.len();
            let line = line.trim_end_matches('\n');
            if line.is_empty() && fields == 0 {
                continue; // Nothing to dispatch (the blank line after a comment).
            }
            if line.is_empty() {
                event.data = data.join("\n");
                found = Some(event);
                break;
            }
            if line.starts_with(':') {
                found = Some(SseEvent { comment: true, data: line.to_string(), ..SseEvent::default() });
                break;
            }
            fields += 1;
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => event.id = Some(value.to_string()),
                "event" => event.event = value.to_string(),
                "data" => data.push(value.to_string()),
                "retry" => event.retry = value.parse().ok(),
                _ => {}
            }
        }
        if found.is_some() {
            self.buffer.drain(..consumed);
        }
        found
    }
}
