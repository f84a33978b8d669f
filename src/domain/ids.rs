//! Opaque ids (`prd_<n>`, `ord_<n>`, `cus_<n>`: one spelling each) and the
//! cursors and page sizes of connections.

use serde::{Deserialize, Serialize};

use super::{invalid, preview, InvalidInput};

macro_rules! opaque_id {
    ($name:ident, $prefix:literal, $what:literal) => {
        #[doc = concat!("The id of a ", $what, "; shown to clients as `", $prefix, "_<n>`.")]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub i64);

        impl $name {
            pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
                // one spelling per id: the digits as Display writes them (no leading zeros)
                raw.strip_prefix(concat!($prefix, "_"))
                    .filter(|n| {
                        !n.is_empty() && n.len() <= 18 && !n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit())
                    })
                    .and_then(|n| n.parse::<i64>().ok())
                    .filter(|n| *n > 0)
                    .map($name)
                    .ok_or_else(|| invalid(format!(concat!("{} is not a valid ", $what, " id"), preview(raw))))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!($prefix, "_{}"), self.0)
            }
        }
    };
}

opaque_id!(ProductId, "prd", "product");
opaque_id!(OrderId, "ord", "order");
opaque_id!(CustomerId, "cus", "customer");

/// A cursor over a list ordered by id: `base64("c:<id>")`.
pub mod cursor {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};

    use super::{invalid, InvalidInput};

    pub fn encode(id: i64) -> String {
        URL_SAFE_NO_PAD.encode(format!("c:{id}"))
    }

    pub fn decode(raw: &str) -> Result<i64, InvalidInput> {
        URL_SAFE_NO_PAD
            .decode(raw)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.strip_prefix("c:").and_then(|n| n.parse::<i64>().ok()))
            .filter(|n| *n > 0)
            .ok_or_else(|| invalid(format!("{} is not a valid cursor", super::preview(raw))))
    }
}

/// `first` of a connection: defaults to 20, capped at 100, at least 0.
pub fn page_size(first: Option<i32>) -> Result<usize, InvalidInput> {
    match first {
        None => Ok(20),
        Some(n) if n < 0 => Err(invalid("first must not be negative")),
        Some(n) => Ok((n as usize).min(100)),
    }
}
