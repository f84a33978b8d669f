//! The two websocket protocols' vocabulary: which one a client asked for,
//! what each client message means ([`ClientOp::parse`]), and every way the
//! server closes a connection ([`Close`], the one table of close codes).

use std::borrow::Cow;

use async_graphql::Request;
use axum::extract::ws::Message;
use serde::Deserialize;
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `graphql-transport-ws`, the graphql-ws library's protocol.
    TransportWs,
    /// `graphql-ws`, the legacy subscriptions-transport-ws protocol.
    Legacy,
}

impl Protocol {
    pub const NAMES: [&'static str; 2] = ["graphql-transport-ws", "graphql-ws"];

    /// The first protocol the client offers that the server speaks: the
    /// client's order of preference, not the server's (Python's `gql` offers
    /// both and speaks the one it lists first).
    /// (axum's `protocols()` keeps the offer in a sorted set, so the header is read here.)
    pub fn preferred(request: &axum::http::HeaderMap) -> Option<&'static str> {
        request
            .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|name| Self::NAMES.into_iter().find(|n| *n == name.trim()))
    }

    pub fn from_name(name: &str) -> Self {
        if name == "graphql-ws" {
            Protocol::Legacy
        } else {
            Protocol::TransportWs
        }
    }
}

/// What a client's message asks for, in either protocol.
#[derive(Debug)]
pub enum ClientOp {
    /// `connection_init`, with its payload (the credential is read from it).
    Init(Option<Value>),
    /// `subscribe` (legacy: `start`): run an operation under this id.
    Subscribe { id: String, request: Box<Request> },
    /// `complete` (legacy: `stop`): stop the operation with this id.
    Stop(String),
    /// `ping` (transport-ws only): answered with a `pong`.
    Ping,
    /// Legacy `connection_terminate`: close normally.
    Terminate,
    /// Nothing to do: a websocket-level ping or pong (the library answers
    /// those), a `pong`, or a stop that names no operation.
    Nothing,
    /// The client closed the socket.
    Closed,
}

#[derive(Deserialize)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    id: Option<String>,
    payload: Option<Value>,
}

impl ClientOp {
    /// Reads one websocket message of `protocol`; what it cannot read is
    /// the close it earns (4400).
    pub fn parse(protocol: Protocol, msg: Message) -> Result<ClientOp, Close> {
        let text = match msg {
            Message::Text(t) => t,
            Message::Binary(_) => return Err(Close::Malformed("binary messages are not supported".into())),
            Message::Ping(_) | Message::Pong(_) => return Ok(ClientOp::Nothing),
            Message::Close(_) => return Ok(ClientOp::Closed),
        };
        let msg: ClientMessage = serde_json::from_str(text.as_str()).map_err(|_| Close::invalid())?;
        let op = match (protocol, msg.kind.as_str()) {
            (_, "connection_init") => ClientOp::Init(msg.payload),
            (Protocol::TransportWs, "subscribe") | (Protocol::Legacy, "start") => {
                let (Some(id), Some(payload)) = (msg.id, msg.payload) else { return Err(Close::invalid()) };
                let request = serde_json::from_value::<Request>(payload).map_err(|_| Close::invalid())?;
                ClientOp::Subscribe { id, request: Box::new(request) }
            }
            (Protocol::TransportWs, "complete") | (Protocol::Legacy, "stop") => match msg.id {
                Some(id) => ClientOp::Stop(id),
                None => ClientOp::Nothing,
            },
            (Protocol::TransportWs, "ping") => ClientOp::Ping,
            (Protocol::TransportWs, "pong") => ClientOp::Nothing,
            (Protocol::Legacy, "connection_terminate") => ClientOp::Terminate,
            _ => return Err(Close::Malformed(format!("Invalid message type {:?}", msg.kind).into())),
        };
        Ok(op)
    }
}

/// The credential in a `connection_init` payload: `Authorization` or
/// `authorization`, at the top level or under `headers`. `Err` when the
/// payload or the value has the wrong shape.
pub fn credential(payload: &Option<Value>) -> Result<Option<String>, ()> {
    let Some(p) = payload else { return Ok(None) };
    if p.is_null() {
        return Ok(None);
    }
    let obj = p.as_object().ok_or(())?;
    let find = |o: &serde_json::Map<String, Value>| o.get("Authorization").or_else(|| o.get("authorization")).cloned();
    let value = find(obj).or_else(|| obj.get("headers").and_then(|h| h.as_object()).and_then(find));
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(()),
    }
}

/// Why the server closes a connection; each has its close code.
#[derive(Debug, PartialEq, Eq)]
pub enum Close {
    /// 4400: a message the protocol does not allow.
    Malformed(Cow<'static, str>),
    /// 4401: an operation before `connection_init`.
    Unauthorized,
    /// 4403: `connection_init` with credentials that are not valid.
    Forbidden,
    /// 4403: the session's token reached its `exp`.
    TokenExpired,
    /// 4408: no `connection_init` within `WS_INIT_TIMEOUT`.
    InitTimeout,
    /// 4408: an anonymous connection ran no operation for `WS_ANONYMOUS_IDLE_TIMEOUT`.
    AnonymousIdle,
    /// 4409: a subscribe under an id that is still running.
    DuplicateId(String),
    /// 4429: a second `connection_init`.
    TooManyInits,
    /// 1000: the client asked to end (legacy `connection_terminate`).
    Normal,
    /// 1001: the server is shutting down.
    ShuttingDown,
}

impl Close {
    fn invalid() -> Close {
        Close::Malformed("Invalid message received".into())
    }

    pub fn code(&self) -> u16 {
        match self {
            Close::Malformed(_) => 4400,
            Close::Unauthorized => 4401,
            Close::Forbidden | Close::TokenExpired => 4403,
            Close::InitTimeout | Close::AnonymousIdle => 4408,
            Close::DuplicateId(_) => 4409,
            Close::TooManyInits => 4429,
            Close::Normal => 1000,
            Close::ShuttingDown => 1001,
        }
    }

    pub fn reason(&self) -> Cow<'static, str> {
        match self {
            Close::Malformed(reason) => reason.clone(),
            Close::Unauthorized => "Unauthorized".into(),
            Close::Forbidden => "Forbidden: invalid or expired credentials".into(),
            Close::TokenExpired => "Forbidden: the token has expired".into(),
            Close::InitTimeout => "Connection initialisation timeout".into(),
            Close::AnonymousIdle => "Idle timeout: an anonymous connection ran no operation".into(),
            Close::DuplicateId(id) => format!("Subscriber for {id} already exists").into(),
            Close::TooManyInits => "Too many initialisation requests".into(),
            Close::Normal => "Normal Closure".into(),
            Close::ShuttingDown => "server shutting down".into(),
        }
    }

    /// The `shopgraph_ws_closed_total` reason, for the closes that are counted.
    pub fn counted_as(&self) -> Option<&'static str> {
        match self {
            Close::TokenExpired => Some("token_expired"),
            Close::AnonymousIdle => Some("anonymous_idle"),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(protocol: Protocol, v: Value) -> Result<ClientOp, Close> {
        ClientOp::parse(protocol, Message::Text(v.to_string().into()))
    }

    #[test]
    fn credentials_are_found_in_either_key_case_and_under_headers() {
        assert_eq!(credential(&Some(json!({"Authorization": "Bearer a"}))), Ok(Some("Bearer a".into())));
        assert_eq!(credential(&Some(json!({"authorization": "Bearer b"}))), Ok(Some("Bearer b".into())));
        assert_eq!(credential(&Some(json!({"headers": {"Authorization": "Bearer c"}}))), Ok(Some("Bearer c".into())));
        assert_eq!(credential(&None), Ok(None));
        assert_eq!(credential(&Some(json!({}))), Ok(None));
        assert!(credential(&Some(json!({"Authorization": 5}))).is_err());
        assert!(credential(&Some(json!("x"))).is_err());
    }

    #[test]
    fn each_protocol_names_its_operations_its_own_way() {
        let payload = json!({"query": "subscription { orderCancelled { reason } }"});
        let start = |kind: &str| json!({"type": kind, "id": "1", "payload": payload});
        assert!(matches!(parse(Protocol::TransportWs, start("subscribe")), Ok(ClientOp::Subscribe { .. })));
        assert!(matches!(parse(Protocol::Legacy, start("start")), Ok(ClientOp::Subscribe { .. })));
        assert!(parse(Protocol::TransportWs, start("start")).is_err());
        assert!(parse(Protocol::Legacy, start("subscribe")).is_err());
        let stop = |kind: &str| json!({"type": kind, "id": "1"});
        assert!(matches!(parse(Protocol::TransportWs, stop("complete")), Ok(ClientOp::Stop(id)) if id == "1"));
        assert!(matches!(parse(Protocol::Legacy, stop("stop")), Ok(ClientOp::Stop(id)) if id == "1"));
        assert!(matches!(parse(Protocol::TransportWs, json!({"type": "ping"})), Ok(ClientOp::Ping)));
        assert!(parse(Protocol::Legacy, json!({"type": "ping"})).is_err());
        let terminate = json!({"type": "connection_terminate"});
        assert!(matches!(parse(Protocol::Legacy, terminate.clone()), Ok(ClientOp::Terminate)));
        assert!(parse(Protocol::TransportWs, terminate).is_err());
    }

    #[test]
    fn what_cannot_be_read_closes_with_4400() {
        for protocol in [Protocol::TransportWs, Protocol::Legacy] {
            let no_id =
                json!({"type": if protocol == Protocol::Legacy { "start" } else { "subscribe" }, "payload": {}});
            for bad in [json!("text"), json!({"type": 7}), json!({"id": "x"}), no_id] {
                assert_eq!(parse(protocol, bad).map(|_| ()).map_err(|c| c.code()), Err(4400));
            }
            let binary = ClientOp::parse(protocol, Message::Binary(vec![1].into()));
            assert_eq!(binary.map(|_| ()).map_err(|c| c.code()), Err(4400));
        }
    }
}
