//! The model store under the data dir: content-addressed blobs and the model
//! versions made from them.
//!
//! ```text
//! DATA/blobs/sha256/<hex>          every file once, named by its sha256, never rewritten
//! DATA/versions/<manifest sha256>/ a version: manifest.json + hard links to its blobs
//! DATA/tmp/                        writes in progress; emptied at start-up
//! DATA/partial/<hex>               a download in progress, resumed after a restart
//! DATA/agent.json                  what serves and what was last deployed
//! DATA/slots/<slot>.json           the same for each model slot
//! ```
//! Model slots share the store (a file two slots use is kept once).
//! Retention keeps what any slot holds, and runs only while no other
//! slot's deployment is in progress, from its start to the end of its swap
//! (its downloads and its new version are not yet in its hold): until then
//! it is deferred, and the last deployment to end applies it.
//! Every write goes to `tmp/`, is fsynced, renamed into place and its
//! directory fsynced, so a power cut leaves either the old state or the new
//! one. A version directory appears in one rename, whole or not at all.

use outpost_protocol::manifest::MANIFEST_FILE;
use outpost_protocol::{ErrorCode, ErrorInfo, Manifest, hex, short_digest};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    tmp_counter: AtomicU64,
    gc: std::sync::Mutex<Gc>,
    /// The slots the last run's unclean exit is blamed on, decided once
    /// from every slot's record before any is rewritten (see
    /// `record::blamed_for_exit`).
    pub exit_blame: std::sync::OnceLock<Vec<String>>,
    /// Held by a model slot's deployment from its memory check to its
    /// model's load in the agent: one load at a time per agent.
    pub loading: std::sync::Mutex<()>,
}

/// What each model slot keeps (by slot key: `""` for the default slot),
/// which slots have a deployment in progress, and whether a retention pass
/// was deferred for them.
#[derive(Debug, Default)]
struct Gc {
    holds: std::collections::BTreeMap<String, Vec<String>>,
    running: std::collections::BTreeSet<String>,
    deferred: bool,
}

/// What can go wrong in the store. [`StoreError::code`] is the wire's error
/// code; the message is what the operator reads.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed (`disk_full` when the disk is full).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A stored file no longer has the digest or size its manifest gives.
    #[error("stored {path}: expected sha256 {}, got {}", short_digest(expected), short_digest(found))]
    Corrupted { path: String, expected: String, found: String },
    /// The stored manifest is not a valid manifest.
    #[error("{0}")]
    Manifest(#[from] outpost_protocol::ProtocolError),
    /// A file of the bundle takes the name of the manifest, which the agent writes.
    #[error("files: \"{0}\" is the name of the manifest itself, which the agent writes")]
    ReservedName(String),
}

impl StoreError {
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::Io { source, .. } if source.raw_os_error() == Some(28) => ErrorCode::DiskFull,
            StoreError::Io { .. } => ErrorCode::Internal,
            StoreError::Corrupted { .. } => ErrorCode::DigestMismatch,
            StoreError::Manifest(e) => e.code,
            StoreError::ReservedName(_) => ErrorCode::InvalidManifest,
        }
    }
}

/// At the wire: code and message.
impl From<StoreError> for ErrorInfo {
    fn from(e: StoreError) -> ErrorInfo {
        ErrorInfo::new(e.code(), e.to_string())
    }
}

fn internal(what: &str, source: std::io::Error) -> StoreError {
    StoreError::Io { what: what.to_string(), source }
}

impl Store {
    /// Opens (creating) the store and removes leftovers of interrupted writes.
    pub fn open(root: &Path) -> std::io::Result<Store> {
        for d in ["blobs/sha256", "versions", "tmp", "partial", "slots"] {
            fs::create_dir_all(root.join(d))?;
        }
        let tmp = root.join("tmp");
        for entry in fs::read_dir(&tmp)? {
            let p = entry?.path();
            let _ = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
        }
        Ok(Store {
            root: root.to_path_buf(),
            tmp_counter: AtomicU64::new(0),
            gc: Default::default(),
            exit_blame: Default::default(),
            loading: Default::default(),
        })
    }

    fn lock_gc(&self) -> std::sync::MutexGuard<'_, Gc> {
        self.gc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `slot`'s deployment in progress, until [`Store::finish`]
    /// (waits for a retention pass in progress to end: call it from a
    /// blocking thread).
    pub fn begin(&self, slot: &str) {
        self.lock_gc().running.insert(slot.to_string());
    }

    /// `slot`'s deployment ended (swapped in, failed or superseded): a
    /// retention pass deferred meanwhile runs once no slot deploys, and
    /// with `partials` the partial downloads go too. Returns (versions
    /// removed, bytes freed).
    pub fn finish(&self, slot: &str, partials: bool) -> (usize, u64) {
        let mut gc = self.lock_gc();
        gc.running.remove(slot);
        if !gc.running.is_empty() {
            return (0, 0);
        }
        let mut done = (0, 0);
        if std::mem::take(&mut gc.deferred) {
            let all: Vec<String> = gc.holds.values().flatten().cloned().collect();
            // Partial downloads stay unless asked (an interrupted one resumes).
            let names: Vec<String> = match partials {
                true => Vec::new(),
                false => fs::read_dir(self.root.join("partial"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect(),
            };
            let keep: Vec<&str> = names.iter().map(String::as_str).collect();
            done = self.retain(&all, &keep);
        }
        if partials {
            done.1 += self.remove_partials();
        }
        done
    }

    /// Records the versions `slot` keeps, without collecting.
    pub fn hold(&self, slot: &str, versions: &[String]) {
        self.lock_gc().holds.insert(slot.to_string(), versions.to_vec());
    }

    /// Retention for `slot`: records that it keeps `keep`, then removes what
    /// no slot keeps (see [`Store::retain`]) — unless another slot's
    /// deployment is in progress: then nothing is removed (None).
    pub fn collect(&self, slot: &str, keep: &[String], keep_partials: &[&str]) -> Option<(usize, u64)> {
        let mut gc = self.lock_gc();
        gc.holds.insert(slot.to_string(), keep.to_vec());
        if gc.running.iter().any(|s| s != slot) {
            gc.deferred = true;
            return None;
        }
        gc.deferred = false;
        let all: Vec<String> = gc.holds.values().flatten().cloned().collect();
        // Held while it runs: no slot starts a deployment meanwhile.
        Some(self.retain(&all, keep_partials))
    }

    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(sha256)
    }

    /// A blob of this digest and size is already stored.
    pub fn has_blob(&self, sha256: &str, size: u64) -> bool {
        fs::metadata(self.blob_path(sha256)).map(|m| m.is_file() && m.len() == size).unwrap_or(false)
    }

    /// Where a download of this blob accumulates until it is verified. Unlike
    /// `tmp/` it survives a restart, so the download can resume.
    pub fn partial_path(&self, sha256: &str) -> PathBuf {
        self.root.join("partial").join(sha256)
    }

    /// A fresh path under `tmp/`.
    pub fn tmp_path(&self, label: &str) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.root.join("tmp").join(format!("{}-{n}-{label}", std::process::id()))
    }

    /// Moves a fully written and verified temp file into the blob store.
    pub fn commit_blob(&self, tmp: &Path, sha256: &str) -> Result<(), StoreError> {
        File::open(tmp).and_then(|f| f.sync_all()).map_err(|e| internal("syncing a download", e))?;
        let dest = self.blob_path(sha256);
        fs::rename(tmp, &dest).map_err(|e| internal("storing a blob", e))?;
        sync_dir(dest.parent().unwrap_or(&self.root)).map_err(|e| internal("syncing the blob directory", e))
    }

    pub fn version_dir(&self, manifest_sha256: &str) -> PathBuf {
        self.root.join("versions").join(manifest_sha256)
    }

    /// Makes the version directory from stored blobs (all must be present).
    /// Idempotent: an existing version is left as it is.
    pub fn materialize(
        &self,
        manifest: &Manifest,
        manifest_bytes: &[u8],
        manifest_sha256: &str,
    ) -> Result<PathBuf, StoreError> {
        let dest = self.version_dir(manifest_sha256);
        if dest.join("manifest.json").is_file() {
            return Ok(dest);
        }
        // The agent writes the manifest beside the files: a file of that name
        // would be a hard link to a blob other versions share.
        if let Some(f) = manifest.files.iter().find(|f| f.path.eq_ignore_ascii_case(MANIFEST_FILE)) {
            return Err(StoreError::ReservedName(f.path.clone()));
        }
        let tmp = self.tmp_path("version");
        fs::create_dir_all(&tmp).map_err(|e| internal("creating a version", e))?;
        for f in &manifest.files {
            let target = tmp.join(&f.path);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(|e| internal(&f.path, e))?;
            }
            let blob = self.blob_path(&f.sha256);
            // Hard links cost no space; blobs are immutable, so sharing is safe
            // (tract memory-maps the model: a file is never rewritten in place).
            if fs::hard_link(&blob, &target).is_err() {
                fs::copy(&blob, &target)
                    .map_err(|e| internal(&format!("{}: copying from the blob store", f.path), e))?;
            }
        }
        write_file_synced(&tmp.join(MANIFEST_FILE), manifest_bytes).map_err(|e| internal(MANIFEST_FILE, e))?;
        sync_tree(&tmp).map_err(|e| internal("syncing a version", e))?;
        crate::sys::crash_point("version-unrenamed");
        if let Err(e) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_dir_all(&tmp);
            if dest.join("manifest.json").is_file() {
                return Ok(dest);
            }
            return Err(internal("installing a version", e));
        }
        sync_dir(&self.root.join("versions")).map_err(|e| internal("syncing versions", e))?;
        Ok(dest)
    }

    /// Re-reads a stored version and checks every file against its manifest,
    /// so a corrupted disk is caught before the model is loaded.
    pub fn verify_version(&self, manifest_sha256: &str) -> Result<(PathBuf, Manifest, Vec<u8>), StoreError> {
        let dir = self.version_dir(manifest_sha256);
        let bytes = fs::read(dir.join("manifest.json"))
            .map_err(|e| internal(&format!("stored version {}", short_digest(manifest_sha256)), e))?;
        let (digest, _) = sha256_file(&dir.join("manifest.json")).map_err(|e| internal("manifest.json", e))?;
        if digest != manifest_sha256 {
            return Err(StoreError::Corrupted {
                path: MANIFEST_FILE.into(),
                expected: manifest_sha256.into(),
                found: digest,
            });
        }
        let manifest = Manifest::from_json(&bytes)?;
        for f in &manifest.files {
            let (d, n) = sha256_file(&dir.join(&f.path)).map_err(|e| internal(&f.path, e))?;
            if n != f.size || d != f.sha256 {
                return Err(StoreError::Corrupted { path: f.path.clone(), expected: f.sha256.clone(), found: d });
            }
        }
        Ok((dir, manifest, bytes))
    }

    /// Writes a small file atomically (temp, fsync, rename, fsync dir).
    pub fn write_atomic(&self, rel: &str, bytes: &[u8]) -> std::io::Result<()> {
        let tmp = self.tmp_path("write");
        write_file_synced(&tmp, bytes)?;
        let dest = self.root.join(rel);
        fs::rename(&tmp, &dest)?;
        sync_dir(dest.parent().unwrap_or(&self.root))
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn read(&self, rel: &str) -> Option<Vec<u8>> {
        fs::read(self.root.join(rel)).ok()
    }

    /// Removes every version not in `keep`, then every blob no kept version
    /// refers to, and partial downloads other than `keep_partials` (by sha256).
    /// Call only while no other deployment is in progress. Returns (versions
    /// removed, bytes freed).
    pub fn retain(&self, keep: &[String], keep_partials: &[&str]) -> (usize, u64) {
        let mut removed = 0;
        let mut freed = 0;
        let mut referenced = std::collections::HashSet::new();
        for entry in fs::read_dir(self.root.join("versions")).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                if let Some(m) =
                    fs::read(entry.path().join("manifest.json")).ok().and_then(|b| Manifest::from_json(&b).ok())
                {
                    referenced.extend(m.files.into_iter().map(|f| f.sha256));
                }
                continue;
            }
            // Out of sight in one rename, then deleted: never a half version in versions/.
            let doomed = self.tmp_path("gc");
            if fs::rename(entry.path(), &doomed).is_ok() {
                let _ = fs::remove_dir_all(&doomed);
                removed += 1;
            }
        }
        for entry in fs::read_dir(self.root.join("blobs/sha256")).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !referenced.contains(&name) {
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                if fs::remove_file(entry.path()).is_ok() {
                    freed += len;
                }
            }
        }
        for entry in fs::read_dir(self.root.join("partial")).into_iter().flatten().flatten() {
            if keep_partials.iter().any(|k| entry.file_name() == *k) {
                continue;
            }
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            if fs::remove_file(entry.path()).is_ok() {
                freed += len;
            }
        }
        let _ = sync_dir(&self.root.join("versions"));
        let _ = sync_dir(&self.root.join("blobs/sha256"));
        (removed, freed)
    }

    /// Removes every partial download (none is in progress): what a failed
    /// or superseded deployment leaves. Returns the bytes freed.
    pub fn remove_partials(&self) -> u64 {
        let mut freed = 0;
        for entry in fs::read_dir(self.root.join("partial")).into_iter().flatten().flatten() {
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            if fs::remove_file(entry.path()).is_ok() {
                freed += len;
            }
        }
        freed
    }

    /// Bytes the store holds (blobs and partial downloads) and the number of
    /// stored versions. Version directories are hard links: they add nothing.
    pub fn usage(&self) -> (u64, u64) {
        let sum = |dir: &str| -> u64 {
            fs::read_dir(self.root.join(dir))
                .map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
                .unwrap_or(0)
        };
        let versions = fs::read_dir(self.root.join("versions")).map(|d| d.count() as u64).unwrap_or(0);
        (sum("blobs/sha256") + sum("partial"), versions)
    }

    /// Bytes a partial download of this blob already holds.
    pub fn partial_len(&self, sha256: &str) -> u64 {
        fs::metadata(self.partial_path(sha256)).map(|m| m.len()).unwrap_or(0)
    }

    /// Bytes the filesystem holding the store can still give an unprivileged writer.
    pub fn available(&self) -> Result<u64, StoreError> {
        let st =
            rustix::fs::statvfs(&self.root).map_err(|e| internal("reading free space", std::io::Error::from(e)))?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }
}

/// Writes a new file: never through an existing one, which could be a hard
/// link to a blob that other versions share.
fn write_file_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        }
    }
    sync_dir(dir)
}

/// sha256 of a file on disk, streamed.
pub fn sha256_file(path: &std::path::Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        hasher.update(&buf[..k]);
        n += k as u64;
    }
    let digest: [u8; 32] = hasher.finalize().into();
    Ok((hex(&digest), n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::hex;
    use sha2::{Digest, Sha256};

    fn sha(b: &[u8]) -> String {
        let d: [u8; 32] = Sha256::digest(b).into();
        hex(&d)
    }

    /// A one-file manifest whose model is `body`, its blob committed to the store.
    fn stored_version(store: &Store, body: &[u8]) -> (Manifest, Vec<u8>, String) {
        let tmp = store.tmp_path("t");
        fs::write(&tmp, body).unwrap();
        store.commit_blob(&tmp, &sha(body)).unwrap();
        let json = serde_json::json!({"schema": "outpost.manifest.v1", "name": "m", "version": "1",
            "files": [{"path": "model.onnx", "sha256": sha(body), "size": body.len()}],
            "model": {"format": "onnx", "file": "model.onnx",
                      "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
                      "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}]}});
        let bytes = serde_json::to_vec(&json).unwrap();
        (Manifest::from_json(&bytes).unwrap(), bytes.clone(), sha(&bytes))
    }

    #[test]
    fn open_removes_leftovers_of_interrupted_writes() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp/half-version")).unwrap();
        fs::write(dir.path().join("tmp/half-blob"), b"x").unwrap();
        Store::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_version_is_verified_before_it_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (m, bytes, msha) = stored_version(&store, b"model bytes");
        let vdir = store.materialize(&m, &bytes, &msha).unwrap();
        assert!(store.verify_version(&msha).is_ok());
        // Idempotent.
        assert_eq!(store.materialize(&m, &bytes, &msha).unwrap(), vdir);
        // Bit rot in the stored model is caught.
        let blob = store.blob_path(&sha(b"model bytes"));
        fs::remove_file(vdir.join("model.onnx")).unwrap();
        fs::write(vdir.join("model.onnx"), b"model bytez").unwrap();
        let e = store.verify_version(&msha).unwrap_err();
        assert_eq!(e.code(), ErrorCode::DigestMismatch);
        assert!(e.to_string().starts_with("stored model.onnx: expected sha256 "), "{e}");
        assert!(blob.is_file());
    }

    #[test]
    fn retention_removes_other_versions_and_their_blobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (m1, b1, s1) = stored_version(&store, b"one");
        let (m2, b2, s2) = stored_version(&store, b"two");
        store.materialize(&m1, &b1, &s1).unwrap();
        store.materialize(&m2, &b2, &s2).unwrap();
        fs::write(store.partial_path(&"f".repeat(64)), b"abandoned").unwrap();
        fs::write(store.partial_path(&"e".repeat(64)), b"resumable").unwrap();
        let (removed, freed) = store.retain(std::slice::from_ref(&s2), &[&"e".repeat(64)]);
        assert_eq!(removed, 1);
        assert_eq!(freed, 3 + 9);
        assert!(!store.version_dir(&s1).exists());
        assert!(store.verify_version(&s2).is_ok());
        assert!(!store.has_blob(&sha(b"one"), 3));
        assert!(store.has_blob(&sha(b"two"), 3));
        assert_eq!(store.usage(), (3 + 9, 1));
        assert_eq!(store.partial_len(&"e".repeat(64)), 9);
    }

    #[test]
    fn a_full_disk_is_reported_as_disk_full() {
        // /dev/full answers every write with ENOSPC, like a full filesystem.
        let mut f = fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let e = f.write_all(&[0u8; 4096]).and_then(|_| f.flush()).unwrap_err();
        let e = internal("storing a blob", e);
        assert_eq!(e.code(), ErrorCode::DiskFull);
        // The cause is kept as the error's source, for the log's cause chain.
        assert!(std::error::Error::source(&e).is_some());
        let dir = tempfile::tempdir().unwrap();
        assert!(Store::open(dir.path()).unwrap().available().unwrap() > 0);
    }
}

#[cfg(test)]
mod shared_blob_tests {
    use super::*;
    use outpost_protocol::hex;
    use sha2::{Digest, Sha256};

    fn sha(b: &[u8]) -> String {
        let d: [u8; 32] = Sha256::digest(b).into();
        hex(&d)
    }

    fn manifest(name: &str, files: &[(&str, &[u8])]) -> (Manifest, Vec<u8>, String) {
        let files: Vec<_> =
            files.iter().map(|(p, b)| serde_json::json!({"path": p, "sha256": sha(b), "size": b.len()})).collect();
        let json = serde_json::json!({"schema": "outpost.manifest.v1", "name": name, "version": "1",
            "files": files,
            "model": {"format": "onnx", "file": "model.onnx",
                      "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
                      "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}]}});
        let bytes = serde_json::to_vec(&json).unwrap();
        // Parsed without validation: the store must hold even if a check upstream did not.
        (serde_json::from_slice(&bytes).unwrap(), bytes.clone(), sha(&bytes))
    }

    fn commit(store: &Store, body: &[u8]) {
        let tmp = store.tmp_path("t");
        fs::write(&tmp, body).unwrap();
        store.commit_blob(&tmp, &sha(body)).unwrap();
    }

    /// Regression (issue 13, defect 7): a bundle that names a file
    /// `manifest.json` whose content is another version's model got that
    /// blob hard-linked at the path where the agent then wrote its own
    /// manifest, through the link: the other version's model was overwritten.
    #[test]
    fn installing_a_version_never_writes_through_a_shared_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let model: &[u8] = b"the model of version one";
        commit(&store, model);
        let (m1, b1, s1) = manifest("one", &[("model.onnx", model)]);
        store.materialize(&m1, &b1, &s1).unwrap();

        // The hostile bundle: its `manifest.json` is version one's model blob.
        let other: &[u8] = b"another model";
        commit(&store, other);
        let (m2, b2, s2) = manifest("two", &[("model.onnx", other), ("manifest.json", model)]);
        let _ = store.materialize(&m2, &b2, &s2);

        assert_eq!(fs::read(store.blob_path(&sha(model))).unwrap(), model, "the shared blob was written through");
        assert!(store.verify_version(&s1).is_ok(), "version one no longer verifies");
    }
}
