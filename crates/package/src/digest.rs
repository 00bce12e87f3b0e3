//! SHA-256 digests of package files, and the `<file>.sha256` sidecar that may accompany a
//! package (`sha256sum` format: the hex digest, then anything).

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result, display_name};

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Hex SHA-256 and size of a file.
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).ctx("open", path)?;
    sha256_reader(&mut f, path)
}

/// Hex SHA-256 and length of everything `r` yields from its current position (`path` names it
/// in errors).
pub fn sha256_reader(r: &mut impl Read, path: &Path) -> Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = r.read(&mut buf).ctx("read", path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex(&h.finalize()), size))
}

/// Checks a hex digest's syntax; returns it lower-cased.
pub fn normalize_digest(d: &str) -> Option<String> {
    (d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit())).then(|| d.to_ascii_lowercase())
}

/// `<file>.sha256`.
pub fn sidecar_path(zip: &Path) -> PathBuf {
    let mut s = zip.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

/// The digest from `<file>.sha256` beside the package, if that file exists.
pub fn sidecar_digest(zip: &Path) -> Result<Option<String>> {
    let side = sidecar_path(zip);
    let text = match fs::read_to_string(&side) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).ctx("read", &side),
    };
    let token = text.split_whitespace().next().unwrap_or("");
    normalize_digest(token).map(Some).ok_or_else(|| {
        Error::bad(
            zip,
            format!(
                "{} does not start with a hex SHA-256 digest",
                display_name(&side)
            ),
        )
    })
}

/// The digest a package must have: `explicit` (validated), else its sidecar's, else none.
pub fn expected_digest(zip: &Path, explicit: Option<&str>) -> Result<Option<String>> {
    match explicit {
        Some(d) => normalize_digest(d)
            .map(Some)
            .ok_or_else(|| Error::bad(zip, format!("expected digest {d:?} is not a hex SHA-256"))),
        None => sidecar_digest(zip),
    }
}

/// Checks `actual` against `expected` (when there is one).
pub fn check_digest(zip: &Path, expected: Option<&str>, actual: &str) -> Result<()> {
    match expected {
        Some(e) if e != actual => Err(Error::digest_mismatch(zip, e, actual)),
        _ => Ok(()),
    }
}

/// Hashes the package file and checks it against its expected digest (the given one, else its
/// `.sha256` sidecar's, if any); returns the actual digest and size.
pub fn digest_checked(zip: &Path, explicit: Option<&str>) -> Result<(String, u64)> {
    let expected = expected_digest(zip, explicit)?;
    let (actual, size) = sha256_file(zip)?;
    check_digest(zip, expected.as_deref(), &actual)?;
    Ok((actual, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        assert!(normalize_digest(&"A".repeat(64)).is_some());
        assert!(normalize_digest(&"g".repeat(64)).is_none());
        assert!(normalize_digest("abc").is_none());
    }

    #[test]
    fn sidecars() {
        let dir = tempfile::tempdir().unwrap();
        let zip = dir.path().join("app-1.0.0.zip");
        fs::write(&zip, b"bytes").unwrap();
        assert_eq!(sidecar_path(&zip), dir.path().join("app-1.0.0.zip.sha256"));
        assert_eq!(expected_digest(&zip, None).unwrap(), None);
        let (d, n) = digest_checked(&zip, None).unwrap();
        assert_eq!(n, 5);
        fs::write(
            sidecar_path(&zip),
            format!("{}  app-1.0.0.zip\n", d.to_uppercase()),
        )
        .unwrap();
        assert_eq!(expected_digest(&zip, None).unwrap(), Some(d.clone()));
        assert!(digest_checked(&zip, None).is_ok());
        let other = "0".repeat(64);
        let e = digest_checked(&zip, Some(&other)).unwrap_err();
        assert!(e.to_string().contains("SHA-256 mismatch"), "{e}");
        fs::write(sidecar_path(&zip), "nonsense\n").unwrap();
        assert!(matches!(
            expected_digest(&zip, None),
            Err(Error::BadPackage { .. })
        ));
    }
}
