//! A throw-away CA and server certificates it signed, made by the `openssl`
//! CLI in a temporary directory: for TLS-only Redis and PostgreSQL servers
//! in tests, and for the benchmark harness's TLS Redis (`bench/src/main.rs`
//! includes this file too).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// A test CA and server certificates it signed.
pub struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.pem"))
    }
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.key"))
    }
    pub fn read(&self, path: &Path) -> Vec<u8> {
        std::fs::read(path).expect("read a generated file")
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("the openssl CLI on PATH");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate `good` for `127.0.0.1` and `localhost`, and
/// one `wrong` that names another host only. Both may also authenticate a
/// client: Cluster nodes dial each other (bus, replication) with them.
pub fn generate_certs() -> Certs {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        d,
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=shopgraph test CA"],
            &["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ]
        .concat(),
    );
    for (name, san) in [("good", "DNS:localhost,IP:127.0.0.1"), ("wrong", "DNS:wrong.example")] {
        let ext = format!(
            "subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
        );
        std::fs::write(d.join(format!("{name}.ext")), ext).unwrap();
        let (key, csr, pem, extfile) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
        openssl(d, &[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={name}")]].concat());
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ],
        );
    }
    Certs { dir }
}
