//! Client text as the contract judges it: the one error type of refused
//! input, how an error message quotes input (a short prefix only), and the
//! characters no stored text may hold.

/// A value a client sent that the contract rejects (`BAD_USER_INPUT`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidInput(pub String);

pub fn invalid(msg: impl Into<String>) -> InvalidInput {
    InvalidInput(msg.into())
}

/// Characters of client input an error message repeats: enough to
/// recognise the value, never enough to make a response grow with it.
pub const PREVIEW_CHARS: usize = 32;

/// Client input as an error message shows it: quoted, and cut after
/// [`PREVIEW_CHARS`] characters.
pub fn preview(raw: &str) -> String {
    match raw.char_indices().nth(PREVIEW_CHARS) {
        None => format!("{raw:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &raw[..end], raw.len()),
    }
}

/// Whether text holds a character no name, SKU, email, currency or key
/// contains: a control character (NUL, tab, newline, escapes, C1 controls)
/// or a bidirectional override that makes text display as something else.
/// Decided here, before any store sees the value: Postgres refuses NUL in
/// `text` and SQLite would store it, so both stores get the same values.
pub fn has_forbidden_chars(raw: &str) -> bool {
    raw.chars().any(|c| c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'))
}
