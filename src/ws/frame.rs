//! A response rendered once, as the JSON text the websocket protocols send:
//! a shared execution renders each response once for all its members, and
//! a connection writes the envelope around the text without parsing it again.

use std::sync::Arc;

use async_graphql::Response;

use super::protocol::Protocol;
use crate::{error::ShopError, graphql::errors};

#[derive(Clone, Debug)]
pub enum Frame {
    /// The `payload` of a `next` (legacy: `data`) message.
    Next(Arc<str>),
    /// The operation failed and ends: the `errors` array, and its first
    /// element (the legacy protocol's `error` payload is one error).
    Error(Arc<(String, String)>),
    /// The operation ended.
    Complete,
}

impl Frame {
    pub fn render(resp: &Response) -> Frame {
        if resp.data == async_graphql::Value::Null && resp.is_err() {
            let all = serde_json::to_string(&resp.errors).unwrap_or_else(|_| "[]".into());
            let first =
                resp.errors.first().and_then(|e| serde_json::to_string(e).ok()).unwrap_or_else(|| "null".into());
            Frame::Error(Arc::new((all, first)))
        } else {
            Frame::Next(serde_json::to_string(resp).unwrap_or_else(|_| "null".into()).into())
        }
    }

    /// The error that ends an operation the connection itself refuses or
    /// stops (the subscription cap, a subscriber that fell behind).
    pub fn refusal(e: ShopError) -> Frame {
        Frame::render(&Response::from_errors(vec![errors::standalone(e)]))
    }

    /// Whether the operation ends with this frame.
    pub fn is_last(&self) -> bool {
        !matches!(self, Frame::Next(_))
    }

    /// The message carrying this frame of operation `id`.
    pub fn envelope(&self, id: &str, protocol: Protocol) -> String {
        let id_json = serde_json::to_string(id).unwrap_or_default();
        let (kind, payload) = match (self, protocol) {
            (Frame::Next(p), Protocol::TransportWs) => ("next", &**p),
            (Frame::Next(p), Protocol::Legacy) => ("data", &**p),
            (Frame::Error(e), Protocol::TransportWs) => ("error", e.0.as_str()),
            (Frame::Error(e), Protocol::Legacy) => ("error", e.1.as_str()),
            (Frame::Complete, _) => return format!("{{\"id\":{id_json},\"type\":\"complete\"}}"),
        };
        let mut text = String::with_capacity(payload.len() + id_json.len() + 32);
        text.push_str("{\"id\":");
        text.push_str(&id_json);
        text.push_str(",\"type\":\"");
        text.push_str(kind);
        text.push_str("\",\"payload\":");
        text.push_str(payload);
        text.push('}');
        text
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn a_refusal_is_an_error_list_or_one_error_as_each_protocol_wants() {
        let frame = Frame::refusal(ShopError::TooManySubscriptions(2));
        assert!(frame.is_last());
        let transport: Value = serde_json::from_str(&frame.envelope("a", Protocol::TransportWs)).unwrap();
        assert_eq!((&transport["id"], &transport["type"]), (&"a".into(), &"error".into()));
        assert_eq!(transport["payload"][0]["extensions"]["code"], errors::RATE_LIMITED);
        let legacy: Value = serde_json::from_str(&frame.envelope("a", Protocol::Legacy)).unwrap();
        assert_eq!(legacy["payload"]["extensions"]["code"], errors::RATE_LIMITED);
        assert!(legacy["payload"]["message"].as_str().unwrap().contains("at most 2"), "{legacy}");
    }
}
