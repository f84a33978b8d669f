//! Domain values, parsed at the edge so that the rest of the code can trust
//! them: client text and its refusals ([`text`]), ids and cursors
//! ([`ids`]), what clients send ([`input`]), and the order records the
//! stores keep and events carry ([`records`]).

mod ids;
mod input;
mod records;
mod text;

pub use ids::*;
pub use input::*;
pub use records::*;
pub use text::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        assert_eq!(OrderId::parse("ord_42").unwrap(), OrderId(42));
        assert_eq!(OrderId(42).to_string(), "ord_42");
        for bad in ["", "ord_", "ord_-1", "ord_0", "prd_1", "ord_1x", "ord_99999999999999999999", "ord_ 1", "ord_01"] {
            assert!(OrderId::parse(bad).is_err(), "{bad}");
        }
        assert!(ProductId::parse("prd_007").is_err());
    }

    #[test]
    fn statuses_round_trip_and_unknown_text_is_no_status() {
        for s in [OrderStatus::PendingPayment, OrderStatus::Paid, OrderStatus::Cancelled] {
            assert_eq!(OrderStatus::from_db(s.as_db()), Some(s));
        }
        for bad in ["", "pending_payment", "REFUNDED", "PAID "] {
            assert_eq!(OrderStatus::from_db(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn quantities_outside_one_to_ten_thousand_are_refused() {
        assert!(Quantity::parse(0).is_err());
        assert!(Quantity::parse(-3).is_err());
        assert!(Quantity::parse(10_001).is_err());
        assert!(Quantity::parse(10_000).is_ok());
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        assert_eq!(cursor::decode(&cursor::encode(7)).unwrap(), 7);
        assert!(cursor::decode("nope!").is_err());
        assert!(cursor::decode("").is_err());
    }

    #[test]
    fn order_requests_refuse_duplicates_and_sort_lines() {
        let q = Quantity(1);
        assert!(OrderRequest::new(vec![(ProductId(2), q), (ProductId(2), q)], None).is_err());
        assert!(OrderRequest::new(vec![], None).is_err());
        let r = OrderRequest::new(vec![(ProductId(3), q), (ProductId(1), q)], None).unwrap();
        assert_eq!(r.lines[0].0, ProductId(1));
    }

    #[test]
    fn control_characters_are_refused_in_every_stored_text() {
        for bad in ["a\0b", "a\u{7}b", "a\nb", "a\tb", "a\u{85}b", "a\u{202E}b", "a\u{1b}[31mb", "ab\n", "\0ab"] {
            assert!(NewProduct::parse("SKU-1", bad, 1, "USD", 1).is_err(), "name {bad:?}");
            assert!(NewProduct::parse(bad, "Name", 1, "USD", 1).is_err(), "sku {bad:?}");
            assert!(parse_idempotency_key(bad).is_err(), "key {bad:?}");
            assert!(Email::parse(&format!("{bad}@example.com")).is_err(), "email {bad:?}");
        }
        assert!(parse_currency("US\0").is_err());
        assert!(NewProduct::parse("SKU-1", "Café crème – 250 g", 1, "EUR", 1).is_ok());
    }

    #[test]
    fn error_messages_show_only_a_prefix_of_long_input() {
        let long = "x".repeat(250_000);
        let e = Email::parse(&long).unwrap_err().0;
        assert!(e.len() < 100, "{e}");
        assert!(e.contains("250000 bytes"), "{e}");
        assert!(ProductId::parse(&long).unwrap_err().0.len() < 100);
        assert_eq!(preview("é".repeat(40).as_str()).chars().filter(|c| *c == 'é').count(), PREVIEW_CHARS);
    }

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(Email::parse(" A@B.io ").unwrap().as_str(), "a@b.io");
        for bad in ["a", "a@b", "@b.io", "a b@c.io", "a@.io"] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
    }
}
