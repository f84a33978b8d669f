//! The one constructor of `redis::Client`: every Redis connection of the
//! process (commands, the expiry listener, the event fan-out, start-up
//! pings) comes from [`client`], so `rediss://` and `REDIS_TLS_CA_FILE` apply
//! to all of them alike. TLS is rustls with the system's roots.

use std::{path::Path, sync::Arc};

use base64::Engine;

/// The CAs of `REDIS_TLS_CA_FILE` (PEM), trusted beside the system's roots.
#[derive(Clone)]
pub struct TrustedCa {
    /// The file's certificates followed by the system's roots, as PEM:
    /// redis-rs trusts a given bundle *instead of* the system's roots.
    bundle: Arc<Vec<u8>>,
}

impl std::fmt::Debug for TrustedCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrustedCa(…)")
    }
}

const PEM_BEGIN: &str = "-----BEGIN CERTIFICATE-----";

impl TrustedCa {
    /// Reads a PEM file of one or more CA certificates.
    pub fn read(path: &Path) -> Result<TrustedCa, String> {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if !String::from_utf8_lossy(&pem).contains(PEM_BEGIN) {
            return Err(format!("{} holds no PEM certificate ({PEM_BEGIN} …)", path.display()));
        }
        let mut bundle = pem;
        bundle.push(b'\n');
        bundle.extend(system_roots_pem());
        Ok(TrustedCa { bundle: Arc::new(bundle) })
    }

    /// The bundle as redis-rs takes it (a Cluster's builder, too).
    pub fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates { client_tls: None, root_cert: Some(self.bundle.to_vec()) }
    }
}

/// The system's trusted roots as PEM (none where the store cannot be read).
fn system_roots_pem() -> Vec<u8> {
    let mut out = String::new();
    for cert in rustls_native_certs::load_native_certs().certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        out.push_str(PEM_BEGIN);
        out.push('\n');
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out.into_bytes()
}

/// A client for `url`; over TLS (`rediss://`) it trusts `ca` as well as the
/// system's roots. The certificates are parsed here, so a bad file fails now.
pub fn client(url: &str, ca: Option<&TrustedCa>) -> redis::RedisResult<redis::Client> {
    match ca {
        Some(ca) if is_tls(url) => redis::Client::build_with_tls(url, ca.certificates()),
        _ => redis::Client::open(url),
    }
}

/// Whether `url` speaks TLS to its data nodes (`rediss://`,
/// `rediss-sentinel://`, `rediss-cluster://`).
pub fn is_tls(url: &str) -> bool {
    let url = url.trim_start();
    url.starts_with("rediss://") || url.starts_with("rediss-sentinel://") || url.starts_with("rediss-cluster://")
}

/// A hint to add to a connection error that looks like a refused
/// certificate, naming the setting that fixes it.
pub fn tls_hint(url: &str, error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if !is_tls(url) {
        if e.contains("connection reset") || e.contains("unexpected end") {
            return " (if the server only speaks TLS, use rediss://)";
        }
        return "";
    }
    if e.contains("certificate") || e.contains("unknownissuer") || e.contains("unknown issuer") {
        " (TLS: the server's certificate is not trusted or does not name this host; set REDIS_TLS_CA_FILE to the PEM file of its CA, and connect by a name the certificate holds)"
    } else {
        ""
    }
}
