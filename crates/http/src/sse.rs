//! Server-sent events: `event: NAME` / `data: JSON` frames, with a comment line every 15 s so
//! that proxies and browsers keep an idle stream open.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};

use crate::Response;

/// How often an idle stream gets a keep-alive comment.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One event: its name and a JSON payload.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: &'static str,
    pub data: serde_json::Value,
}

/// The wire form of one event. JSON never contains a raw newline, so one `data:` line holds it.
pub fn frame(event: &Event) -> Bytes {
    Bytes::from(format!("event: {}\ndata: {}\n\n", event.name, event.data))
}

/// A streaming response of `events`, interleaved with keep-alive comments.
pub fn response(events: impl Stream<Item = Event> + Send + 'static) -> Response {
    let ticks = interval(KEEP_ALIVE).map(|_| Some(Bytes::from_static(b": keep-alive\n\n")));
    // A `None` marks the end of the events; the keep-alive ticks alone never end a stream.
    let frames = events
        .map(|e| Some(frame(&e)))
        .chain(futures::stream::once(async { None }));
    let merged = futures::stream::select(frames, ticks)
        .take_while(|f| std::future::ready(f.is_some()))
        .filter_map(|f| std::future::ready(f.map(|b| Ok::<_, Infallible>(Frame::data(b)))));
    let mut r = hyper::Response::new(StreamBody::new(merged).boxed_unsync());
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn interval(period: Duration) -> impl Stream<Item = ()> + Send {
    futures::stream::unfold(
        tokio::time::interval_at(tokio::time::Instant::now() + period, period),
        |mut iv| async move {
            iv.tick().await;
            Some(((), iv))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_one_event_line_and_one_data_line() {
        let f = frame(&Event {
            name: "rollout",
            data: serde_json::json!({"id": "r000001", "msg": "a\nb"}),
        });
        assert_eq!(
            std::str::from_utf8(&f).unwrap(),
            "event: rollout\ndata: {\"id\":\"r000001\",\"msg\":\"a\\nb\"}\n\n"
        );
    }
}
