//! Who is asking: the admin token, customer JWTs (HS256, `sub` + `exp`),
//! password hashing (argon2, off the async threads), and the [`Viewer`] that
//! decides who may see an order.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::{
    config::Secret,
    domain::{CustomerId, Order},
};

/// The caller of one request or websocket connection, decided once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    Anonymous,
    Customer(CustomerId),
    Admin,
}

impl Identity {
    /// Who this caller is as a viewer of orders; anonymous callers see none.
    pub fn viewer(self) -> Result<Viewer, SignInRequired> {
        match self {
            Identity::Anonymous => Err(SignInRequired),
            Identity::Customer(c) => Ok(Viewer::Customer(c)),
            Identity::Admin => Ok(Viewer::Admin),
        }
    }
}

/// A caller who may see orders: the one rule of who sees which. An order a
/// viewer may not see is reported exactly like one that does not exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Viewer {
    /// Sees every order.
    Admin,
    /// Sees its own orders.
    Customer(CustomerId),
}

impl Viewer {
    pub fn may_see(self, order: &Order) -> bool {
        match self {
            Viewer::Admin => true,
            Viewer::Customer(c) => order.customer_id == c,
        }
    }

    /// The customer a query for this viewer's orders is limited to (`None`: all).
    pub fn owner(self) -> Option<CustomerId> {
        match self {
            Viewer::Admin => None,
            Viewer::Customer(c) => Some(c),
        }
    }
}

/// An anonymous caller asked about orders.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("sign in to see your orders")]
pub struct SignInRequired;

/// An identity and when its credential stops being valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    pub identity: Identity,
    /// The customer token's `exp`; `None` for the admin token and anonymous
    /// callers, whose credentials do not expire.
    pub expires_at: Option<SystemTime>,
}

/// A bearer credential that is present but not valid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the bearer token is invalid or expired")]
pub struct InvalidToken;

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    iat: u64,
}

/// How many checked customer tokens [`Auth`] remembers (about 250 bytes each).
const CHECKED_TOKENS: usize = 65_536;

pub struct Auth {
    admin_token: Option<Secret>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// The HS256 key of customer tokens, prepared once: jsonwebtoken derives
    /// it from the secret again for every token it checks, which was most of
    /// the cost of an authenticated request's token check.
    signing: ring::hmac::Key,
    /// How a customer token's claims are checked once its signature is
    /// (built once: building it allocates a set of claim names).
    validation: Validation,
    /// Customer tokens whose signature and claims passed, by their exact
    /// text: a storefront sends the same token with every request, and a
    /// token equal to one that passed passes again until its `exp` (only
    /// the expiry is looked at again). Checking it was about a tenth of an
    /// authenticated request's instructions. Only tokens that passed get
    /// in, and at most [`CHECKED_TOKENS`] of them. Every authenticated
    /// request looks here, so lookups share a read lock.
    checked: RwLock<HashMap<Box<str>, (CustomerId, u64)>>,
    lifetime: Duration,
    /// A real argon2 hash verified for unknown emails, so that a login's
    /// timing does not tell whether the email exists.
    dummy_hash: String,
    /// Hashes running at once: each takes 19 MiB and a core, so a burst of
    /// logins queues here instead of taking the machine's memory.
    hashing: tokio::sync::Semaphore,
}

impl Auth {
    pub fn new(admin_token: Option<Secret>, jwt_secret: &[u8], lifetime: Duration) -> Arc<Self> {
        let dummy_hash = hash_password_blocking("not-a-real-password-0123456789");
        Arc::new(Auth {
            admin_token,
            encoding: EncodingKey::from_secret(jwt_secret),
            decoding: DecodingKey::from_secret(jwt_secret),
            signing: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, jwt_secret),
            validation: customer_claims_validation(),
            checked: RwLock::default(),
            lifetime,
            dummy_hash,
            hashing: tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())),
        })
    }

    pub fn admin_configured(&self) -> bool {
        self.admin_token.is_some()
    }

    /// The identity for an `Authorization` header value (or websocket
    /// `connection_init` value). No value is anonymous; a bad one is an error,
    /// never anonymous.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Identity, InvalidToken> {
        self.authenticate_session(header).map(|s| s.identity)
    }

    /// Like [`Auth::authenticate`], with the credential's expiry: a
    /// websocket session ends there.
    pub fn authenticate_session(&self, header: Option<&str>) -> Result<Session, InvalidToken> {
        let forever = |identity| Ok(Session { identity, expires_at: None });
        let Some(raw) = header.map(str::trim).filter(|h| !h.is_empty()) else {
            return forever(Identity::Anonymous);
        };
        let token = match raw.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            // "Bearer" with nothing after it: no credential, as if absent
            None if raw.eq_ignore_ascii_case("bearer") => return forever(Identity::Anonymous),
            _ => return Err(InvalidToken),
        };
        if let Some(admin) = &self.admin_token {
            if bool::from(admin.0.as_bytes().ct_eq(token.as_bytes())) {
                return forever(Identity::Admin);
            }
        }
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(&(id, exp)) = self.checked.read().expect("token memo lock").get(token) {
            // expired ones go the whole way, which refuses them
            if exp > now {
                let expires_at = UNIX_EPOCH + Duration::from_secs(exp);
                return Ok(Session { identity: Identity::Customer(id), expires_at: Some(expires_at) });
            }
        }
        // the signature first, as jsonwebtoken checks it: over `header.payload`,
        // the expected one encoded as a token carries it and compared in
        // constant time; then the claims, and that the header says HS256
        let (signed, signature) = token.rsplit_once('.').ok_or(InvalidToken)?;
        let expected = URL_SAFE_NO_PAD.encode(ring::hmac::sign(&self.signing, signed.as_bytes()));
        if !bool::from(expected.as_bytes().ct_eq(signature.as_bytes())) {
            return Err(InvalidToken);
        }
        let data = decode::<Claims>(token, &self.decoding, &self.validation).map_err(|_| InvalidToken)?;
        if data.header.alg != Algorithm::HS256 {
            return Err(InvalidToken);
        }
        let id = CustomerId::parse(&data.claims.sub).map_err(|_| InvalidToken)?;
        self.remember_checked(token, id, data.claims.exp);
        let expires_at = UNIX_EPOCH + Duration::from_secs(data.claims.exp);
        Ok(Session { identity: Identity::Customer(id), expires_at: Some(expires_at) })
    }

    fn remember_checked(&self, token: &str, id: CustomerId, exp: u64) {
        let mut checked = self.checked.write().expect("token memo lock");
        if checked.len() >= CHECKED_TOKENS {
            // simpler than evicting one by one, and as rare as this many
            // distinct customers between two fillings
            checked.clear();
        }
        checked.insert(token.into(), (id, exp));
    }

    pub fn issue_token(&self, customer: CustomerId) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims { sub: customer.to_string(), iat: now, exp: now + self.lifetime.as_secs() };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).expect("HS256 encoding cannot fail")
    }

    pub async fn hash_password(&self, password: String) -> String {
        let _permit = self.hashing.acquire().await.expect("the semaphore is never closed");
        tokio::task::spawn_blocking(move || hash_password_blocking(&password)).await.expect("hashing does not panic")
    }

    /// Checks `password` against `hash`, or against a dummy hash when the
    /// customer is unknown, so both paths cost the same.
    pub async fn verify_password(&self, password: String, hash: Option<String>) -> bool {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy_hash.clone());
        let _permit = self.hashing.acquire().await.expect("the semaphore is never closed");
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        ok && known
    }
}

/// `exp` and `sub` required, no leeway on `exp`. The signature (HS256
/// only) is checked before, by [`Auth::authenticate_session`] with its
/// prepared key.
fn customer_claims_validation() -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.insecure_disable_signature_validation();
    validation
}

fn hash_password_blocking(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default().hash_password(password.as_bytes(), &salt).expect("argon2 with default parameters").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{OrderId, OrderStatus};

    fn auth() -> Arc<Auth> {
        Auth::new(Some(Secret("admin-secret".into())), b"0123456789abcdef0123", Duration::from_secs(60))
    }

    #[test]
    fn tokens_round_trip_and_forgeries_are_refused() {
        let a = auth();
        let t = a.issue_token(CustomerId(7));
        assert_eq!(a.authenticate(Some(&format!("Bearer {t}"))), Ok(Identity::Customer(CustomerId(7))));
        let other = Auth::new(None, b"another-secret-entirely", Duration::from_secs(60));
        assert_eq!(other.authenticate(Some(&format!("Bearer {t}"))), Err(InvalidToken));
        assert_eq!(a.authenticate(Some("Bearer garbage")), Err(InvalidToken));
        assert_eq!(a.authenticate(Some("Basic abc")), Err(InvalidToken));
        assert_eq!(a.authenticate(None), Ok(Identity::Anonymous));
        assert_eq!(a.authenticate(Some("Bearer admin-secret")), Ok(Identity::Admin));
    }

    /// A token with these claims and this header, signed with the secret of [`auth`].
    fn signed(header: &Header, exp: u64) -> String {
        let claims = Claims { sub: CustomerId(7).to_string(), iat: 0, exp };
        encode(header, &claims, &EncodingKey::from_secret(b"0123456789abcdef0123")).unwrap()
    }

    #[test]
    fn only_an_unexpired_hs256_token_with_its_own_signature_passes() {
        let a = auth();
        let bearer = |t: &str| a.authenticate(Some(&format!("Bearer {t}")));
        let later = jsonwebtoken::get_current_timestamp() + 60;
        let good = signed(&Header::new(Algorithm::HS256), later);
        assert_eq!(bearer(&good), Ok(Identity::Customer(CustomerId(7))));
        // signed with the right secret, but expired, or under another algorithm
        assert_eq!(bearer(&signed(&Header::new(Algorithm::HS256), later - 120)), Err(InvalidToken));
        assert_eq!(bearer(&signed(&Header::new(Algorithm::HS512), later)), Err(InvalidToken));
        // an HS256 signature over a header that names another algorithm
        let (_, rest) = good.split_once('.').unwrap();
        let (payload, _) = rest.split_once('.').unwrap();
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"HS384"}"#);
        let message = format!("{header}.{payload}");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"0123456789abcdef0123");
        let sig = URL_SAFE_NO_PAD.encode(ring::hmac::sign(&key, message.as_bytes()));
        assert_eq!(bearer(&format!("{message}.{sig}")), Err(InvalidToken));
        // the payload changed, the signature padded, cut, or missing
        let (message, sig) = good.rsplit_once('.').unwrap();
        let forged = format!(
            "{}.{}.{sig}",
            message.split('.').next().unwrap(),
            URL_SAFE_NO_PAD.encode(br#"{"sub":"cus_8","exp":9999999999}"#)
        );
        assert_eq!(bearer(&forged), Err(InvalidToken));
        assert_eq!(bearer(&format!("{message}.{sig}=")), Err(InvalidToken));
        assert_eq!(bearer(&format!("{message}.{}", &sig[1..])), Err(InvalidToken));
        assert_eq!(bearer(message), Err(InvalidToken));
        assert_eq!(bearer(&format!("{message}.")), Err(InvalidToken));
    }

    #[test]
    fn a_remembered_token_passes_until_its_exp_and_refused_ones_are_not_remembered() {
        let a = auth();
        let bearer = |t: &str| a.authenticate_session(Some(&format!("Bearer {t}")));
        let now = jsonwebtoken::get_current_timestamp();
        let good = signed(&Header::new(Algorithm::HS256), now + 60);
        let first = bearer(&good).unwrap();
        assert_eq!(bearer(&good).unwrap(), first, "the same session from the memo");
        assert_eq!(a.checked.read().unwrap().len(), 1);
        // a token that passed while it was valid, now past its exp
        let stale = signed(&Header::new(Algorithm::HS256), now - 1);
        a.remember_checked(&stale, CustomerId(7), now - 1);
        assert_eq!(bearer(&stale), Err(InvalidToken));
        // refusals leave nothing behind
        let other = Auth::new(None, b"another-secret-entirely", Duration::from_secs(60));
        let foreign = other.issue_token(CustomerId(8));
        assert_eq!(bearer(&foreign), Err(InvalidToken));
        assert_eq!(bearer(&format!("{good}x")), Err(InvalidToken));
        assert_eq!(a.checked.read().unwrap().len(), 2, "the good token and the stale one put there by hand");
    }

    #[test]
    fn a_customer_session_ends_at_its_tokens_exp_and_the_admin_one_never() {
        let a = auth();
        let before = SystemTime::now();
        let t = a.issue_token(CustomerId(7));
        let s = a.authenticate_session(Some(&format!("Bearer {t}"))).unwrap();
        let exp = s.expires_at.expect("a customer token expires");
        let lifetime = exp.duration_since(before).unwrap_or_default();
        assert!(lifetime <= Duration::from_secs(60) && lifetime > Duration::from_secs(58), "{lifetime:?}");
        assert_eq!(a.authenticate_session(Some("Bearer admin-secret")).unwrap().expires_at, None);
        assert_eq!(a.authenticate_session(None).unwrap().expires_at, None);
    }

    #[test]
    fn the_admin_sees_every_order_a_customer_its_own_and_anonymous_callers_none() {
        let order = |customer| Order {
            id: OrderId(1),
            customer_id: CustomerId(customer),
            status: OrderStatus::PendingPayment,
            lines: Vec::new(),
            total_cents: 0,
            currency: "USD".into(),
            created_at: chrono::Utc::now(),
            expires_at: chrono::Utc::now(),
            paid_at: None,
            cancelled_at: None,
            cancel_reason: None,
        };
        let (mine, theirs) = (order(1), order(2));
        let admin = Identity::Admin.viewer().unwrap();
        assert!(admin.may_see(&mine) && admin.may_see(&theirs));
        assert_eq!(admin.owner(), None);
        let customer = Identity::Customer(CustomerId(1)).viewer().unwrap();
        assert!(customer.may_see(&mine) && !customer.may_see(&theirs));
        assert_eq!(customer.owner(), Some(CustomerId(1)));
        assert_eq!(Identity::Anonymous.viewer(), Err(SignInRequired));
    }
}
