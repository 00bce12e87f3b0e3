//! Hostile packages: each one is refused by `Store::unpack`, `Store::install` and
//! `package::verify` with a clear error, and nothing changes anywhere: the whole temp tree
//! (store root, package directory and their parent, where an escaping entry would land) is
//! snapshotted before and after (paths, kinds, sizes, modes, small files' bytes).

mod common;

use std::fs;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use common::*;
use orch_release::{Error, Limits, PackageSource, Store, package};
use zip::CompressionMethod;
use zip::write::{SimpleFileOptions, ZipWriter};

/// `base/` holds `root/` (a store with 4.2.0 installed, so it is lived-in) and `pkgs/`.
struct Fx {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
    pkgs: PathBuf,
    store: Store,
}

impl Fx {
    fn new() -> Fx {
        Fx::with_limits(Limits::default())
    }
    fn with_limits(limits: Limits) -> Fx {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let root = base.join("root");
        let pkgs = base.join("pkgs");
        fs::create_dir_all(base.join("work")).unwrap();
        let good = build_pkg(&base.join("work"), &pkgs, "4.2.0", &Spec::default());
        let store = open_with(&root, |c| c.limits = limits);
        store.install(&file_src(&good), true).unwrap();
        Fx {
            _tmp: tmp,
            base,
            root,
            pkgs,
            store,
        }
    }

    /// Writes `bytes` as `pkgs/<file_name>` with a matching `.sha256` sidecar (so the digest
    /// passes and what is tested is the content).
    fn put(&self, file_name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.pkgs.join(file_name);
        fs::write(&path, bytes).unwrap();
        let (digest, _) = package::sha256_file(&path).unwrap();
        fs::write(
            package::sidecar_path(&path),
            format!("{digest}  {file_name}\n"),
        )
        .unwrap();
        path
    }

    /// Asserts that the package is refused everywhere with `needle` in the message and that
    /// nothing in the temp tree changed.
    fn refused(&self, path: &Path, sha256: Option<&str>, needle: &str) {
        let src = PackageSource::File {
            path: path.to_path_buf(),
            sha256: sha256.map(str::to_string),
        };
        let before = snapshot(&self.base);
        let listing_before = listing(&self.store);
        let check = |what: &str, e: Error| {
            let msg = e.to_string();
            assert!(
                matches!(e, Error::BadPackage { .. }),
                "{what}: expected BadPackage, got {e:?}"
            );
            assert!(
                msg.contains(needle),
                "{what}: {msg:?} should contain {needle:?}"
            );
            assert!(msg.contains("nothing was changed"), "{what}: {msg}");
            assert!(!msg.contains('\n'), "{what}: one line expected: {msg:?}");
        };
        check("unpack", self.store.unpack(&src).unwrap_err());
        assert_eq!(snapshot(&self.base), before, "unpack changed something");
        check("install", self.store.install(&src, true).unwrap_err());
        check(
            "upgrade --no-permanent",
            self.store.install(&src, false).unwrap_err(),
        );
        assert_eq!(snapshot(&self.base), before, "install changed something");
        check(
            "verify",
            package::verify(path, sha256, None, &self.store.config().limits).unwrap_err(),
        );
        assert_eq!(snapshot(&self.base), before, "verify changed something");
        // `verify_entries` is `verify` without the digest (`rollout --package` hashes the file
        // in a pass of its own): whatever the digest lets through, it refuses just the same.
        if package::digest_checked(path, sha256).is_ok() {
            check(
                "verify_entries",
                package::verify_entries(path, None, &self.store.config().limits).unwrap_err(),
            );
        }
        assert_eq!(listing(&self.store), listing_before);
        assert_consistent(&self.store);
    }
}

enum E<'a> {
    File(&'a str, Vec<u8>),
    /// A file with raw external attributes (unix mode in the high 16 bits).
    Attrs(&'a str, Vec<u8>, u32),
    Dir(&'a str),
    Link(&'a str, &'a str),
}

fn manifest(name: &str, version: &str) -> E<'static> {
    E::File(
        "release.toml",
        format!("name = \"{name}\"\nversion = \"{version}\"\n").into_bytes(),
    )
}

fn zip_bytes(entries: &[E<'_>], method: CompressionMethod) -> Vec<u8> {
    let mut w = ZipWriter::new(Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default()
        .compression_method(method)
        .unix_permissions(0o644);
    for e in entries {
        match e {
            E::File(name, data) => {
                w.start_file(*name, opts).unwrap();
                w.write_all(data).unwrap();
            }
            E::Attrs(name, data, attrs) => {
                w.start_file(*name, opts.external_attributes(*attrs))
                    .unwrap();
                w.write_all(data).unwrap();
            }
            E::Dir(name) => w.add_directory(*name, opts).unwrap(),
            E::Link(name, target) => w.add_symlink(*name, *target, opts).unwrap(),
        }
    }
    w.finish().unwrap().into_inner()
}

fn zip_of(entries: &[E<'_>]) -> Vec<u8> {
    zip_bytes(entries, CompressionMethod::Deflated)
}

/// Replaces every occurrence of `from` (an entry name: local header and central directory)
/// with `to`, same length so offsets stay valid.
fn patch_name(bytes: &mut [u8], from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let (from, to) = (from.as_bytes(), to.as_bytes());
    let mut hits = 0;
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            hits += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    assert!(hits >= 2, "expected the name in both headers, found {hits}");
}

/// Positions of the local (`PK\3\4`) and central (`PK\1\2`) headers of entry `name`.
fn headers_of(bytes: &[u8], name: &str) -> (Vec<usize>, Vec<usize>) {
    let n = name.as_bytes();
    let (mut local, mut central) = (Vec::new(), Vec::new());
    for i in 0..bytes.len().saturating_sub(n.len()) {
        if &bytes[i..i + n.len()] != n {
            continue;
        }
        if i >= 30 && bytes[i - 30..i - 26] == *b"PK\x03\x04" {
            let len = u16::from_le_bytes([bytes[i - 4], bytes[i - 3]]) as usize;
            if len == n.len() {
                local.push(i - 30);
            }
        }
        if i >= 46 && bytes[i - 46..i - 42] == *b"PK\x01\x02" {
            let len = u16::from_le_bytes([bytes[i - 18], bytes[i - 17]]) as usize;
            if len == n.len() {
                central.push(i - 46);
            }
        }
    }
    (local, central)
}

fn put_u32(bytes: &mut [u8], at: usize, val: u32) {
    bytes[at..at + 4].copy_from_slice(&val.to_le_bytes());
}

fn ok_entries() -> Vec<E<'static>> {
    vec![
        manifest("emqx", "4.2.1"),
        E::Dir("bin/"),
        E::File("bin/app", b"app 4.2.1\n".to_vec()),
    ]
}

/// The raw builder makes acceptable packages: every refusal below is due to the hostile part.
#[test]
fn control_a_raw_package_is_accepted() {
    let fx = Fx::new();
    let path = fx.put("emqx-4.2.1.zip", &zip_of(&ok_entries()));
    let info = package::verify(&path, None, None, &Limits::default()).unwrap();
    assert_eq!((info.name.as_str(), info.version), ("emqx", v("4.2.1")));
    assert_eq!(info.entries, 3);
    fx.store.unpack(&file_src(&path)).unwrap();
    assert_eq!(
        fs::read(fx.root.join("releases/4.2.1/bin/app")).unwrap(),
        b"app 4.2.1\n"
    );
    assert_consistent(&fx.store);
}

// ---- digests ----

#[test]
fn digest_mismatch_in_the_sidecar() {
    let fx = Fx::new();
    let path = fx.put("emqx-4.2.1.zip", &zip_of(&ok_entries()));
    fs::write(
        package::sidecar_path(&path),
        format!("{}  emqx-4.2.1.zip\n", "ab".repeat(32)),
    )
    .unwrap();
    fx.refused(&path, None, "SHA-256 mismatch");
}

#[test]
fn digest_mismatch_given_explicitly_even_when_the_sidecar_matches() {
    let fx = Fx::new();
    let path = fx.put("emqx-4.2.1.zip", &zip_of(&ok_entries()));
    fx.refused(&path, Some(&"0".repeat(64)), "SHA-256 mismatch");
}

#[test]
fn digest_that_is_not_a_digest() {
    let fx = Fx::new();
    let path = fx.put("emqx-4.2.1.zip", &zip_of(&ok_entries()));
    fx.refused(&path, Some("abc123"), "not a hex SHA-256");
    for garbage in [
        "garbage\n",
        "",
        "  \n",
        &format!("{}zz  x\n", "a".repeat(62)),
    ] {
        fs::write(package::sidecar_path(&path), garbage).unwrap();
        fx.refused(&path, None, "does not start with a hex SHA-256");
    }
}

#[test]
fn digest_mismatch_through_lookup_in_the_releases_dir() {
    let fx = Fx::new();
    let rel = fx.root.join("releases");
    let zip = rel.join("emqx-4.2.1.zip");
    fs::write(&zip, zip_of(&ok_entries())).unwrap();
    fs::write(package::sidecar_path(&zip), "f".repeat(64)).unwrap();
    let before = snapshot(&fx.base);
    for r in [
        fx.store.unpack(&PackageSource::Lookup(v("4.2.1"))),
        fx.store.install(&PackageSource::Lookup(v("4.2.1")), true),
    ] {
        let e = r.unwrap_err();
        assert!(e.to_string().contains("SHA-256 mismatch"), "{e}");
    }
    assert_eq!(snapshot(&fx.base), before);
}

// ---- not a zip ----

#[test]
fn truncated_zip() {
    let fx = Fx::new();
    let full = zip_of(&ok_entries());
    for keep in [full.len() / 2, full.len() - 10, 30] {
        let path = fx.put("emqx-4.2.1.zip", &full[..keep]);
        fx.refused(&path, None, "not a valid zip archive");
    }
}

#[test]
fn corrupted_entry_data_is_caught_by_the_crc() {
    let fx = Fx::new();
    let big: Vec<u8> = (0..20_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let mut bytes = zip_bytes(
        &[manifest("emqx", "4.2.1"), E::File("bin/data", big)],
        CompressionMethod::Stored,
    );
    let (local, _) = headers_of(&bytes, "bin/data");
    let data_at = local[0] + 30 + "bin/data".len() + 1000;
    bytes[data_at] ^= 0xff;
    let path = fx.put("emqx-4.2.1.zip", &bytes);
    fx.refused(&path, None, "bin/data");
}

#[test]
fn random_bytes_named_zip() {
    let fx = Fx::new();
    let mut rng = fastrand::Rng::with_seed(7);
    let bytes: Vec<u8> = (0..10_000).map(|_| rng.u8(..)).collect();
    let path = fx.put("emqx-4.2.1.zip", &bytes);
    fx.refused(&path, None, "not a valid zip archive");
}

#[test]
fn empty_file() {
    let fx = Fx::new();
    let path = fx.put("emqx-4.2.1.zip", b"");
    fx.refused(&path, None, "not a valid zip archive");
}

// ---- escaping paths, links, special files ----

#[test]
fn entries_with_dot_dot() {
    let fx = Fx::new();
    // From releases/.unpack-*/: one `..` lands in releases/, three land beside the root.
    for name in [
        "../x",
        "a/../../x",
        "../../../escape",
        "bin/../../../../escape",
        "a/b/../../../escape",
    ] {
        let mut entries = ok_entries();
        entries.push(E::File(name, b"pwned".to_vec()));
        let path = fx.put("emqx-4.2.1.zip", &zip_of(&entries));
        fx.refused(&path, None, "escapes the release directory");
    }
    // Also when the escaping entry comes first, before the manifest.
    let mut entries = vec![E::File("../../../escape", b"pwned".to_vec())];
    entries.extend(ok_entries());
    let path = fx.put("emqx-4.2.1.zip", &zip_of(&entries));
    fx.refused(&path, None, "escapes the release directory");
    assert!(!fx.base.join("escape").exists());
    assert!(!fx.root.join("escape").exists());
    assert!(!fx.root.join("releases/x").exists());
}

#[test]
fn entries_with_absolute_paths() {
    let fx = Fx::new();
    let target = fx.base.join("abs-escape");
    let name = target.to_str().unwrap().to_string();
    for n in [name.as_str(), "/tmp", "//etc/x"] {
        let mut entries = ok_entries();
        entries.push(E::File(n, b"pwned".to_vec()));
        let path = fx.put("emqx-4.2.1.zip", &zip_of(&entries));
        fx.refused(&path, None, "escapes the release directory");
    }
    assert!(!target.exists());
}

#[test]
fn entries_with_backslashes_or_nul() {
    let fx = Fx::new();
    for n in ["..\\..\\escape", "bin\\app2"] {
        let mut entries = ok_entries();
        entries.push(E::File(n, b"x".to_vec()));
        let path = fx.put("emqx-4.2.1.zip", &zip_of(&entries));
        fx.refused(&path, None, "escapes the release directory");
    }
    // A NUL byte, patched in (the writer would not take it).
    let mut entries = ok_entries();
    entries.push(E::File("bin/aXb", b"x".to_vec()));
    let mut bytes = zip_of(&entries);
    patch_name(&mut bytes, "bin/aXb", "bin/a\0b");
    let path = fx.put("emqx-4.2.1.zip", &bytes);
    fx.refused(&path, None, "bin/a");
}

#[test]
fn symlink_entries() {
    let fx = Fx::new();
    for target in ["/etc/passwd", "../../..", "app"] {
        let mut entries = ok_entries();
        entries.push(E::Link("bin/link", target));
        let path = fx.put("emqx-4.2.1.zip", &zip_of(&entries));
        fx.refused(&path, None, "is a symbolic link");
    }
    // A link followed by a file written through it.
    let mut entries = ok_entries();
    entries.push(E::Link("out", "../../.."));
    entries.push(E::File("out/escape", b"pwned".to_vec()));
    let path = fx.put("emqx-4.2.1.zip", &zip_of(&entries));
    fx.refused(&path, None, "is a symbolic link");
    assert!(!fx.base.join("escape").exists());
}

#[test]
fn device_files_fifos_and_sockets() {
    let fx = Fx::new();
    for (mode, what) in [
        (0o020644u32, "a character device"),
        (0o060644, "a block device"),
        (0o010644, "a FIFO"),
        (0o140644, "a socket"),
        (0o160644, "not a regular file or directory"),
    ] {
        let mut entries = ok_entries();
        entries.push(E::Attrs("bin/dev", Vec::new(), mode << 16));
        let path = fx.put("emqx-4.2.1.zip", &zip_of(&entries));
        fx.refused(&path, None, what);
    }
}

#[test]
fn setuid_bits_are_dropped_not_refused() {
    // Not hostile enough to refuse: the store keeps rwx bits only.
    let fx = Fx::new();
    let mut entries = ok_entries();
    entries.push(E::Attrs("bin/suid", b"x".to_vec(), 0o104755 << 16));
    let path = fx.put("emqx-4.2.1.zip", &zip_of(&entries));
    fx.store.unpack(&file_src(&path)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(fx.root.join("releases/4.2.1/bin/suid"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "{mode:o}");
}

#[test]
fn encrypted_entries() {
    let fx = Fx::new();
    let mut bytes = zip_bytes(&ok_entries(), CompressionMethod::Stored);
    let (local, central) = headers_of(&bytes, "bin/app");
    assert_eq!((local.len(), central.len()), (1, 1));
    // General purpose flag bit 0: encrypted.
    bytes[local[0] + 6] |= 1;
    bytes[central[0] + 8] |= 1;
    let path = fx.put("emqx-4.2.1.zip", &bytes);
    fx.refused(&path, None, "bin/app");
}

// ---- zip bombs ----

fn many_entries(n: usize) -> Vec<E<'static>> {
    let mut entries = vec![manifest("emqx", "4.2.1")];
    for i in 0..n {
        let name: &'static str = Box::leak(format!("f/{i}").into_boxed_str());
        entries.push(E::File(name, b"x".to_vec()));
    }
    entries
}

#[test]
fn more_entries_than_the_limit() {
    let limits = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    let fx = Fx::with_limits(limits);
    // Exactly at the limit is fine.
    let at = fx.put("emqx-4.2.1.zip", &zip_of(&many_entries(9)));
    package::verify(&at, None, None, &limits).unwrap();
    let path = fx.put("emqx-4.2.1.zip", &zip_of(&many_entries(10)));
    fx.refused(&path, None, "11 entries, more than the limit of 10");
    // Directory entries count too.
    let mut entries = many_entries(9);
    entries.push(E::Dir("d/"));
    let path = fx.put("emqx-4.2.1.zip", &zip_of(&entries));
    fx.refused(&path, None, "more than the limit of 10");
}

#[test]
fn deflate_bomb_over_the_size_limit() {
    let limits = Limits {
        max_total_bytes: 10 << 20,
        ..Limits::default()
    };
    let fx = Fx::with_limits(limits);
    let zeros = vec![0u8; 50 << 20];
    let mut entries = ok_entries();
    entries.push(E::File("bin/zeros", zeros));
    let bytes = zip_of(&entries);
    assert!(bytes.len() < 200 << 10, "not a bomb: {} bytes", bytes.len());
    let path = fx.put("emqx-4.2.1.zip", &bytes);
    fx.refused(&path, None, "more than the limit of 10485760");
    // Spread over many entries that are each under the limit.
    let mut entries = ok_entries();
    for i in 0..6 {
        let name: &'static str = Box::leak(format!("bin/zeros{i}").into_boxed_str());
        entries.push(E::File(name, vec![0u8; 2 << 20]));
    }
    let path = fx.put("emqx-4.2.1.zip", &zip_of(&entries));
    fx.refused(&path, None, "more than the limit");
}

#[test]
fn entry_whose_declared_size_lies() {
    // The central directory says 1000 bytes; the data inflates to 50 MB. The declared total is
    // under the limit, so only the streaming cap can catch it.
    let limits = Limits {
        max_total_bytes: 10 << 20,
        ..Limits::default()
    };
    let fx = Fx::with_limits(limits);
    let mut entries = ok_entries();
    entries.push(E::File("bin/liar", vec![0u8; 50 << 20]));
    let mut bytes = zip_of(&entries);
    let (local, central) = headers_of(&bytes, "bin/liar");
    assert_eq!((local.len(), central.len()), (1, 1));
    put_u32(&mut bytes, local[0] + 22, 1000);
    put_u32(&mut bytes, central[0] + 24, 1000);
    let path = fx.put("emqx-4.2.1.zip", &bytes);
    fx.refused(&path, None, "bin/liar");
    // The same lie with the default (huge) limit is still refused: the entry is larger than
    // it claims.
    let fx = Fx::new();
    let path = fx.put("emqx-4.2.1.zip", &bytes);
    fx.refused(&path, None, "bin/liar");
}

// ---- manifest and names ----

#[test]
fn missing_release_toml() {
    let fx = Fx::new();
    let path = fx.put(
        "emqx-4.2.1.zip",
        &zip_of(&[E::File("bin/app", b"x".to_vec())]),
    );
    fx.refused(&path, None, "no release.toml");
    // Only in a subdirectory does not count.
    let path = fx.put(
        "emqx-4.2.1.zip",
        &zip_of(&[E::File(
            "sub/release.toml",
            b"name = \"emqx\"\nversion = \"4.2.1\"\n".to_vec(),
        )]),
    );
    fx.refused(&path, None, "no release.toml");
    // A directory called release.toml is not a manifest either.
    let path = fx.put(
        "emqx-4.2.1.zip",
        &zip_of(&[E::Dir("release.toml/"), E::File("bin/app", b"x".to_vec())]),
    );
    fx.refused(&path, None, "release.toml");
}

#[test]
fn release_toml_that_disagrees_with_the_file_name() {
    let fx = Fx::new();
    for (name, version) in [("other", "4.2.1"), ("emqx", "4.2.2"), ("emqx-ee", "4.2.1")] {
        let path = fx.put(
            "emqx-4.2.1.zip",
            &zip_of(&[manifest(name, version), E::File("bin/app", b"x".to_vec())]),
        );
        fx.refused(
            &path,
            None,
            &format!("release.toml says {name} {version} but the file name says emqx 4.2.1"),
        );
    }
}

#[test]
fn invalid_release_toml() {
    let fx = Fx::new();
    for (text, needle) in [
        ("name = \"emqx\"\nversion = \"4.2\"\n", "invalid version"),
        (
            "name = \"emqx\"\nversion = \"4.2.1-rc1\"\n",
            "invalid version",
        ),
        ("name = \"emqx\"\nversion = \"04.2.1\"\n", "invalid version"),
        (
            "name = \"../evil\"\nversion = \"4.2.1\"\n",
            "invalid package name",
        ),
        ("name = \"emqx\"\n", "release.toml is not valid"),
        ("not toml [", "release.toml is not valid"),
        (
            "name = \"emqx\"\nversion = 4\n",
            "release.toml is not valid",
        ),
    ] {
        let path = fx.put(
            "emqx-4.2.1.zip",
            &zip_of(&[
                E::File("release.toml", text.as_bytes().to_vec()),
                E::File("bin/app", b"x".to_vec()),
            ]),
        );
        fx.refused(&path, None, needle);
    }
    // Not UTF-8.
    let path = fx.put(
        "emqx-4.2.1.zip",
        &zip_of(&[E::File("release.toml", vec![0xff, 0xfe, b'n'])]),
    );
    fx.refused(&path, None, "release.toml");
}

#[test]
fn invalid_version_or_name_in_the_file_name() {
    let fx = Fx::new();
    for file_name in [
        "emqx-4.2.zip",
        "emqx-4.02.1.zip",
        "emqx-v4.2.1.zip",
        "emqx-4.2.1.1.zip",
        "emqx_4.2.1.zip",
        "emqx-4.2.1.tar.gz",
        "-4.2.1.zip",
        ".hidden-4.2.1.zip",
    ] {
        let path = fx.put(file_name, &zip_of(&ok_entries()));
        fx.refused(&path, None, "file name");
        fs::remove_file(&path).unwrap();
        fs::remove_file(package::sidecar_path(&path)).unwrap();
    }
}

// ---- duplicates ----

#[test]
fn duplicate_entries() {
    let fx = Fx::new();
    // Two entries with one name (the writer refuses this, so the second name is patched in).
    let mut bytes = zip_of(&[
        manifest("emqx", "4.2.1"),
        E::File("bin/app", b"first\n".to_vec()),
        E::File("bin/apq", b"second, different\n".to_vec()),
    ]);
    patch_name(&mut bytes, "bin/apq", "bin/app");
    let path = fx.put("emqx-4.2.1.zip", &bytes);
    fx.refused(&path, None, "same name");
}

#[test]
fn duplicate_manifests() {
    let fx = Fx::new();
    let mut bytes = zip_of(&[
        manifest("emqx", "4.2.1"),
        E::File(
            "release.tomm",
            b"name = \"emqx\"\nversion = \"4.2.1\"\nhidden = true\n".to_vec(),
        ),
    ]);
    patch_name(&mut bytes, "release.tomm", "release.toml");
    let path = fx.put("emqx-4.2.1.zip", &bytes);
    fx.refused(&path, None, "same name");
}

#[test]
fn duplicate_entries_after_normalisation() {
    // `bin/app` and `./bin/app` are one path on disk.
    let fx = Fx::new();
    let path = fx.put(
        "emqx-4.2.1.zip",
        &zip_of(&[
            manifest("emqx", "4.2.1"),
            E::File("bin/app", b"first\n".to_vec()),
            E::File("./bin/app", b"second\n".to_vec()),
        ]),
    );
    fx.refused(&path, None, "bin/app");
}

#[test]
fn a_file_and_a_directory_with_one_path() {
    // `bin/app` is a file, then `bin/app/x` needs it to be a directory (and the reverse).
    let fx = Fx::new();
    let path = fx.put(
        "emqx-4.2.1.zip",
        &zip_of(&[
            manifest("emqx", "4.2.1"),
            E::File("bin/app", b"x".to_vec()),
            E::File("bin/app/x", b"y".to_vec()),
        ]),
    );
    fx.refused(&path, None, "bin/app");
    let path = fx.put(
        "emqx-4.2.1.zip",
        &zip_of(&[
            manifest("emqx", "4.2.1"),
            E::Dir("bin/app/"),
            E::File("bin/app", b"x".to_vec()),
        ]),
    );
    fx.refused(&path, None, "bin/app");
}

/// Found by the `package` fuzz target (crates/release/fuzz): an entry the central directory
/// calls stored (uncompressed) with 28 bytes of data for 26 bytes of contents, while its local
/// header calls it deflated. `verify` refused it, but `extract` wrote the entry truncated, so
/// what an unpack installs differed from what verification read. Both now refuse any stored
/// entry whose two sizes differ, and extraction refuses an entry that yields fewer bytes than
/// it declares; `extract` leaves nothing behind.
#[test]
fn extract_refuses_what_verify_refuses_stored_entry_longer_than_declared() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = tmp.path().join("app-1.0.0.zip");
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz-stored-size-lie.zip"),
        &zip,
    )
    .unwrap();
    let limits = Limits {
        max_total_bytes: 1 << 20,
        max_entries: 64,
    };
    let v = package::verify(&zip, None, None, &limits);
    assert!(matches!(v, Err(Error::BadPackage { .. })), "verify: {v:?}");
    let dest = tmp.path().join("out");
    let x = package::extract(&zip, &dest, None, None, &limits);
    assert!(
        matches!(x, Err(Error::BadPackage { .. })),
        "extract accepted it: {x:?}"
    );
    assert!(!dest.exists());
}

/// Sets an entry's declared (uncompressed) size in its local header and the central directory.
fn patch_declared_size(bytes: &mut [u8], name: &str, size: u32) {
    let name = name.as_bytes();
    let mut hits = 0;
    for i in 0..bytes.len().saturating_sub(4) {
        let (size_at, name_at) = match &bytes[i..i + 4] {
            [0x50, 0x4b, 0x03, 0x04] => (i + 22, i + 30),
            [0x50, 0x4b, 0x01, 0x02] => (i + 24, i + 46),
            _ => continue,
        };
        if bytes.get(name_at..name_at + name.len()) == Some(name) {
            bytes[size_at..size_at + 4].copy_from_slice(&size.to_le_bytes());
            hits += 1;
        }
    }
    assert_eq!(hits, 2, "local header and central directory entry");
}

/// A deflated entry whose data is genuine (its CRC matches) but that declares more contents
/// than it inflates to: both `verify` and `extract` refuse it, naming the entry, and `extract`
/// leaves nothing. (Readers that trust the declared size would see a different file.)
#[test]
fn an_entry_shorter_than_declared_is_refused_by_verify_and_extract() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = zip_of(&[
        manifest("app", "1.0.0"),
        E::File("payload.txt", b"hello, world\n".to_vec()),
    ]);
    patch_declared_size(&mut bytes, "payload.txt", 20);
    let zip = tmp.path().join("app-1.0.0.zip");
    fs::write(&zip, &bytes).unwrap();
    let limits = Limits {
        max_total_bytes: 1 << 20,
        max_entries: 64,
    };
    let v = package::verify(&zip, None, None, &limits);
    match &v {
        Err(Error::BadPackage { reason, .. }) => assert!(
            reason.contains("payload.txt") && reason.contains("declares 20"),
            "{reason}"
        ),
        other => panic!("verify accepted it: {other:?}"),
    }
    let dest = tmp.path().join("out");
    let x = package::extract(&zip, &dest, None, None, &limits);
    assert!(
        matches!(&x, Err(Error::BadPackage { reason, .. }) if reason.contains("payload.txt")),
        "extract: {x:?}"
    );
    assert!(!dest.exists());
}

/// Found by the `package` fuzz target after the fix above: an entry whose name says file but
/// whose MS-DOS attributes say directory, holding 28 bytes of data under an unknown compression
/// method. `verify` (going by the name) refused the method; extraction (going by the mode)
/// made it an empty directory and accepted the package. Both now classify entries the same way
/// and refuse a directory that holds data.
#[test]
fn an_entry_marked_as_a_directory_but_holding_data_is_refused_by_both() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = tmp.path().join("app-1.0.0.zip");
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/fuzz-dir-attribute-with-data.zip"),
        &zip,
    )
    .unwrap();
    let limits = Limits {
        max_total_bytes: 1 << 20,
        max_entries: 64,
    };
    for (what, r) in [
        (
            "verify",
            package::verify(&zip, None, None, &limits).map(|_| ()),
        ),
        (
            "extract",
            package::extract(&zip, &tmp.path().join("out"), None, None, &limits).map(|_| ()),
        ),
    ] {
        match r {
            Err(Error::BadPackage { reason, .. }) => assert!(
                reason.contains("hooks/activate") && reason.contains("directory"),
                "{what}: {reason}"
            ),
            other => panic!("{what} accepted it: {other:?}"),
        }
    }
    assert!(!tmp.path().join("out").exists());
}
