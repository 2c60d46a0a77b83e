//! One suite, every backend: local directory, memory, and Azure Blob (Azurite).
//!
//! The Azure run needs Azurite, which `scripts/test` starts (it sets BOOMERANG_TEST_AZURITE,
//! AZURE_STORAGE_USE_EMULATOR and AZURITE_BLOB_STORAGE_URL). Outside CI it is skipped with a
//! message when Azurite is absent; in CI (CI=true) that is a failure.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use boomerang_core::sample::XorShift as Rng;
use boomerang_core::{DiskName, PointId};
use boomerang_store::{CommitOptions, DataKey, Keep, NoProgress, Store, StoreError};
use boomerang_testkit::{azurite, unique};
use bytes::Bytes;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjPath;

const BLOCK: u64 = 4096;

fn disk() -> DiskName {
    DiskName::new("web-01-disk0").unwrap()
}

async fn commit(store: &Store, image: &Path) -> boomerang_store::CommitReport {
    store
        .commit_image(&disk(), image, CommitOptions::default(), &NoProgress)
        .await
        .unwrap()
}

/// Exports a point and returns its bytes.
async fn export(store: &Store, dir: &Path, id: PointId) -> Result<Vec<u8>, StoreError> {
    let p = store.point(&disk(), Some(id)).await?;
    let out = dir.join(format!("export-{id}.img"));
    store.export_raw(&p, &out, &NoProgress).await?;
    Ok(std::fs::read(out).unwrap())
}

/// Changed block ranges between two images, merged, as the diff should report them: a block
/// counts as changed if its content differs (a grown tail block included), clipped to the
/// common size; the grown part follows.
fn expected_diff(a: &[u8], b: &[u8]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let common = a.len().min(b.len());
    for start in (0..common).step_by(BLOCK as usize) {
        let end = (start + BLOCK as usize).min(common);
        let block = |v: &[u8]| v[start..(start + BLOCK as usize).min(v.len())].to_vec();
        if block(a) != block(b) {
            match out.last_mut() {
                Some((o, l)) if *o + *l == start as u64 => *l += (end - start) as u64,
                _ => out.push((start as u64, (end - start) as u64)),
            }
        }
    }
    if b.len() > a.len() {
        match out.last_mut() {
            Some((o, l)) if *o + *l == common as u64 => *l += (b.len() - common) as u64,
            _ => out.push((common as u64, (b.len() - common) as u64)),
        }
    }
    out
}

/// The conformance suite. `store` is fresh and empty, with 4 KiB blocks.
async fn suite(store: Store) {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    let mut rng = Rng::new(7);

    // 3 MiB + a short tail block: 769 blocks, a tree of depth 2.
    let mut data = vec![0u8; 3 * 1024 * 1024 + 5000];
    rng.fill(&mut data[..1024 * 1024]);
    data[2 * 1024 * 1024..2 * 1024 * 1024 + 300_000].fill(0x5a);
    let tail = data.len() - 10;
    data[tail] = 0xee;
    std::fs::write(&image, &data).unwrap();
    let mut versions = vec![data.clone()];
    let first = commit(&store, &image).await;
    assert_eq!(first.point, PointId(1));
    assert_eq!(first.stats.bytes_read, data.len() as u64);
    assert!(first.stats.bytes_stored > 0);

    // The same image again stores nothing.
    let again = commit(&store, &image).await;
    assert_eq!(again.stats.blocks_changed, 0);
    assert_eq!(
        again.stats.bytes_stored, 0,
        "an unchanged image must not write objects"
    );
    versions.push(data.clone());

    // Random writes, a zeroed range, a rewritten tail.
    for _ in 0..40 {
        let off = (rng.next_u64() % (data.len() as u64 - 700)) as usize;
        rng.fill(&mut data[off..off + 700]);
    }
    data[0..64 * 1024].fill(0);
    let n = data.len();
    data[n - 1] = 1;
    std::fs::write(&image, &data).unwrap();
    let third = commit(&store, &image).await;
    assert!(third.stats.blocks_changed > 0 && third.stats.blocks_changed < 120);
    versions.push(data.clone());

    // Growth.
    data.extend(std::iter::repeat_n(0x33u8, 300_000));
    std::fs::write(&image, &data).unwrap();
    commit(&store, &image).await;
    versions.push(data.clone());

    // Every point reads back exactly.
    for (i, v) in versions.iter().enumerate() {
        let got = export(&store, tmp.path(), PointId(i as u64 + 1))
            .await
            .unwrap();
        assert!(got == *v, "point {} does not read back as committed", i + 1);
    }

    // Diff finds exactly the changed blocks, and only them.
    for (a, b) in [(1u64, 2u64), (2, 3), (1, 4), (3, 4)] {
        let pa = store.point(&disk(), Some(PointId(a))).await.unwrap();
        let pb = store.point(&disk(), Some(PointId(b))).await.unwrap();
        let got: Vec<(u64, u64)> = store
            .diff(&pa, &pb)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.offset, r.len))
            .collect();
        let want = expected_diff(&versions[a as usize - 1], &versions[b as usize - 1]);
        assert_eq!(got, want, "diff {a} -> {b}");
    }

    // Shrinking is refused with a clear error.
    std::fs::write(&image, &data[..data.len() - 8192]).unwrap();
    let err = store
        .commit_image(&disk(), &image, CommitOptions::default(), &NoProgress)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("smaller than"), "{err}");

    // The store is intact.
    let report = store.verify(&NoProgress).await.unwrap();
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    assert_eq!(report.points, 4);

    // Prune to the newest point, GC: the last point still reads, nothing dangles, space shrinks.
    let before = count_objects(&store).await;
    let pruned = store.prune(Keep::Last(1)).await.unwrap();
    assert_eq!(pruned.removed.len(), 3);
    let gc = store.gc(&NoProgress).await.unwrap();
    assert!(gc.deleted_objects > 0);
    assert_eq!(count_objects(&store).await, before - gc.deleted_objects);
    assert!(export(&store, tmp.path(), PointId(4)).await.unwrap() == versions[3]);
    assert!(store.verify(&NoProgress).await.unwrap().bad.is_empty());
    assert_eq!(store.points(None).await.unwrap().len(), 1);

    // A flipped byte in a chunk: verify names disk, point and offset; export refuses.
    let flipped = flip_first_chunk_of(&store, &versions[3], 1024 * 1024 - 4096).await;
    let report = store.verify(&NoProgress).await.unwrap();
    assert!(
        report.bad.iter().any(|b| b.object == flipped
            && b.point == Some(PointId(4))
            && b.offset == Some(1024 * 1024 - 4096)),
        "verify did not name the damaged block: {:?}",
        report.bad
    );
    let err = export(&store, tmp.path(), PointId(4)).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("web-01-disk0") && msg.contains("point 4") && msg.contains("offset 1044480"),
        "{msg}"
    );
    assert!(
        !tmp.path().join("export-4.img.partial").exists(),
        "a failed export must not leave a partial file"
    );

    // A damaged manifest is named by verify and refused by reads.
    let manifest = "points/web-01-disk0/00000000000000000004.point";
    let mut m = store
        .backend()
        .durable
        .get(&ObjPath::from(manifest))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let len = m.len();
    m.truncate(len - 7);
    store
        .backend()
        .durable
        .put(&ObjPath::from(manifest), m.into())
        .await
        .unwrap();
    let err = store.points(None).await.unwrap_err();
    assert!(err.to_string().contains(manifest), "{err}");
    let report = store.verify(&NoProgress).await.unwrap();
    assert!(report.bad.iter().any(|b| b.object == manifest));
}

async fn count_objects(store: &Store) -> u64 {
    use futures::TryStreamExt;
    let mut n = 0;
    for prefix in ["chunks", "nodes"] {
        let v: Vec<_> = store
            .backend()
            .objects_at(prefix)
            .list(Some(&ObjPath::from(prefix)))
            .try_collect()
            .await
            .unwrap();
        n += v.len() as u64;
    }
    n
}

/// Flips one byte of the chunk holding the block at `offset`; returns the object path.
async fn flip_first_chunk_of(store: &Store, image: &[u8], offset: usize) -> String {
    let block = &image[offset..offset + BLOCK as usize];
    let path = Store::chunk_path(&store.hash(block));
    flip_byte(store, &path, None, 0x10).await;
    path
}

/// XORs byte `at` (the middle one, with none) of object `path` of `store` with `mask`.
async fn flip_byte(store: &Store, path: &str, at: Option<usize>, mask: u8) {
    let objects = store.backend().objects_at(path);
    let p = ObjPath::from(path);
    let mut bytes = objects
        .get(&p)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let at = at.unwrap_or(bytes.len() / 2);
    bytes[at] ^= mask;
    objects.put(&p, Bytes::from(bytes).into()).await.unwrap();
}

/// Collects `store` again and again (pruning to its last two points first, with `prune`)
/// until `done`, at most 5000 times, counting in `ran` the collections that ran (one that
/// finds a commit running backs off).
fn collect_until(
    store: Store,
    prune: bool,
    done: Arc<AtomicBool>,
    ran: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for _ in 0..5000 {
            if done.load(Ordering::SeqCst) {
                break;
            }
            if prune {
                let _ = store.prune(Keep::Last(2)).await;
            }
            match store.gc(&NoProgress).await {
                Ok(_) => {
                    ran.fetch_add(1, Ordering::SeqCst);
                }
                Err(StoreError::Conflict(_)) => {}
                Err(e) => panic!("gc failed: {e}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    })
}

/// Commits and GCs race; afterwards every point reads back and nothing dangles.
async fn gc_races_commits(store: Store) {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    let mut rng = Rng::new(99);
    let mut data = vec![0u8; 1024 * 1024];
    rng.fill(&mut data);
    std::fs::write(&image, &data).unwrap();
    commit(&store, &image).await;
    // GC runs in a loop for as long as the commits do; between commits the commit loop waits
    // (at most 2 s) for one GC to complete, so GCs both collide with commits and succeed.
    let ran = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let gcs = collect_until(store.clone(), true, done.clone(), ran.clone());
    let mut last = Vec::new();
    for _ in 0..8 {
        for _ in 0..10 {
            let off = (rng.next_u64() % (data.len() as u64 - 100)) as usize;
            rng.fill(&mut data[off..off + 100]);
        }
        std::fs::write(&image, &data).unwrap();
        commit(&store, &image).await;
        last = data.clone();
        let before = ran.load(Ordering::SeqCst);
        for _ in 0..200 {
            if ran.load(Ordering::SeqCst) > before {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    done.store(true, Ordering::SeqCst);
    gcs.await.unwrap();
    let ran = ran.load(Ordering::SeqCst);
    assert!(ran > 0, "no gc ran");
    store.gc(&NoProgress).await.unwrap();
    let report = store.verify(&NoProgress).await.unwrap();
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    let latest = store.latest(&disk()).await.unwrap().unwrap();
    assert!(export(&store, tmp.path(), latest.id).await.unwrap() == last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_directory() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().join("store");
    let store = Store::init(loc.to_str().unwrap(), BLOCK).await.unwrap();
    suite(store).await;
    let loc2 = dir.path().join("store2");
    gc_races_commits(Store::init(loc2.to_str().unwrap(), BLOCK).await.unwrap()).await;
    // Chunks live under chunks/ where tools can find them.
    assert!(loc2.join("chunks").is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_directory_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let key = DataKey::create(&dir.path().join("store.key")).unwrap();
    let loc = dir.path().join("store");
    let store = Store::init_sealed(loc.to_str().unwrap(), BLOCK, &key)
        .await
        .unwrap();
    assert!(store.sealed());
    suite(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_store_shows_nothing_and_opens_with_its_key_only() {
    let dir = tempfile::tempdir().unwrap();
    let key = DataKey::create(&dir.path().join("store.key")).unwrap();
    let loc = dir.path().join("store");
    let loc = loc.to_str().unwrap();
    let store = Store::init_sealed(loc, BLOCK, &key).await.unwrap();
    // A recognizable image: a text block repeated, and a block of its own.
    let text = b"the machine's secret ledger, line after line. ".repeat(90)[..4096].to_vec();
    let mut image = text.repeat(8);
    image.extend_from_slice(&[0x42; 4096]);
    // (And two that do not compress: chunk objects of their own.)
    let mut noise = vec![0u8; 4096];
    Rng::new(4).fill(&mut noise);
    image.extend_from_slice(&noise);
    let mut other_noise = vec![0u8; 4096];
    Rng::new(5).fill(&mut other_noise);
    image.extend_from_slice(&other_noise);
    let path = dir.path().join("disk.img");
    std::fs::write(&path, &image).unwrap();
    commit(&store, &path).await;
    // Nothing stored holds the text, and no object is named by the content's plain hash.
    let mut objects = 0;
    for entry in walk(&dir.path().join("store")) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(32).any(|w| w == &text[..32]),
            "{} holds the plaintext",
            entry.display()
        );
        objects += 1;
    }
    assert!(objects > 2, "chunks and nodes were written");
    let plain = Store::chunk_path(&boomerang_store::chunk::hash(&text));
    assert!(!dir.path().join("store").join(&plain).exists());
    // (The text block compresses to little: it is in a pack, under its keyed name.)
    let usage = store.usage().await.unwrap();
    assert!(usage.pack_objects >= 2, "{usage:?}");
    let plain_name = boomerang_store::chunk::hash(&text).0;
    for entry in walk(&dir.path().join("store")) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(32).any(|w| w == plain_name),
            "{} names the content by its plain hash",
            entry.display()
        );
    }
    // The key is needed, and only this one: each refusal says which and what to do.
    let err = Store::open(loc).await.unwrap_err().to_string();
    assert!(
        err.contains("sealed") && err.contains("--key-file"),
        "{err}"
    );
    let other = DataKey::create(&dir.path().join("other.key")).unwrap();
    let err = Store::open_with_key(loc, Some(&other))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&key.id()) && err.contains(&other.id()) && err.contains("not the key"),
        "{err}"
    );
    let again = DataKey::read(&dir.path().join("store.key")).unwrap();
    let store = Store::open_with_key(loc, Some(&again)).await.unwrap();
    let latest = store.latest(&disk()).await.unwrap().unwrap();
    assert!(export(&store, dir.path(), latest.id).await.unwrap() == image);
    // An object put in place of another (both sealed under the key) is refused, by name.
    let (a, b) = (
        dir.path()
            .join("store")
            .join(Store::chunk_path(&store.hash(&noise))),
        dir.path()
            .join("store")
            .join(Store::chunk_path(&store.hash(&other_noise))),
    );
    std::fs::copy(&b, &a).unwrap();
    let err = export(&store, dir.path(), latest.id)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&Store::chunk_path(&store.hash(&noise))) && err.contains("web-01-disk0"),
        "{err}"
    );
    let report = store.verify(&NoProgress).await.unwrap();
    assert!(!report.bad.is_empty(), "verify finds the swapped object");
    // A key given for a store in the clear is refused: it would be written in the clear.
    let plain = dir.path().join("plain");
    let plain = plain.to_str().unwrap();
    Store::init(plain, BLOCK).await.unwrap();
    let err = Store::open_with_key(plain, Some(&again))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not sealed"), "{err}");
    // Destroyed, it is no store, and nothing of it is left.
    assert!(Store::destroy(loc).await.unwrap() > 2);
    assert!(matches!(
        Store::open_with_key(loc, Some(&again)).await,
        Err(StoreError::Missing { .. })
    ));
    assert!(walk(&dir.path().join("store")).is_empty());
}

/// Every file under `dir`, recursively, but the store's config.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else if !path.ends_with("boomerang-store.json") {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory() {
    suite(Store::init("memory://", BLOCK).await.unwrap()).await;
    gc_races_commits(Store::init("memory://", BLOCK).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_blob() {
    if !azurite() {
        return;
    }
    let loc = format!("azure://{}/site-b", unique("conformance"));
    let store = Store::init(&loc, BLOCK).await.unwrap();
    // init is not repeated silently.
    assert!(matches!(
        Store::init(&loc, BLOCK).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    suite(Store::open(&loc).await.unwrap()).await;
    drop(store);
    let loc2 = format!("azure://{}", unique("gcrace"));
    gc_races_commits(Store::init(&loc2, BLOCK).await.unwrap()).await;
    // Sealed, on Azure Blob: the same suite.
    let key = DataKey::from_bytes([0x5e; 32]);
    let loc3 = format!("azure://{}/sealed", unique("conformance"));
    suite(Store::init_sealed(&loc3, BLOCK, &key).await.unwrap()).await;
    // In a group on Azure Blob: the same suite, its chunks in the group's namespace.
    let root = format!("azure://{}/site-b", unique("group"));
    let grouped = Store::init_in_group(&root, "web01/lineage-0", BLOCK, Some(&key))
        .await
        .unwrap();
    suite(
        Store::open_with_key(&format!("{root}/web01/lineage-0"), Some(&key))
            .await
            .unwrap(),
    )
    .await;
    drop(grouped);
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    let err = Store::open(missing.to_str().unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("boomerang store init"), "{err}");

    let err = Store::init(dir.path().join("s").to_str().unwrap(), 3000)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("power of two"), "{err}");
    let err = Store::init(dir.path().join("s").to_str().unwrap(), 8 << 20)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("4 MiB"), "{err}");

    let store = Store::init(dir.path().join("s").to_str().unwrap(), BLOCK)
        .await
        .unwrap();
    let err = store
        .commit_image(
            &disk(),
            &dir.path().join("no-such.img"),
            CommitOptions::default(),
            &NoProgress,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no-such.img"), "{err}");
    let err = store.point(&disk(), None).await.unwrap_err();
    assert!(err.to_string().contains("has no points"), "{err}");

    let err = Store::open("s3://bucket").await.unwrap_err();
    assert!(err.to_string().contains("unknown scheme"), "{err}");
    let err = Store::open("azure://A_B").await.unwrap_err();
    assert!(err.to_string().contains("container name"), "{err}");
}

/// Bytes of the chunk objects in a group's shared namespace under `root` (a directory).
fn shared_chunk_bytes(root: &Path) -> u64 {
    walk(&root.join(".shared/chunks"))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_in_a_group_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let key = DataKey::create(&dir.path().join("group.key")).unwrap();
    let root = dir.path().join("root");
    let root = root.to_str().unwrap();
    let store = Store::init_in_group(root, "web01/lineage-0", BLOCK, Some(&key))
        .await
        .unwrap();
    suite(store).await;
    let plain = dir.path().join("plain");
    let plain = plain.to_str().unwrap();
    suite(
        Store::init_in_group(plain, "web01/lineage-0", BLOCK, None)
            .await
            .unwrap(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_in_a_group_keep_common_blocks_once_and_collect_only_what_none_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = DataKey::create(&d.join("group.key")).unwrap();
    let root_dir = d.join("root");
    let root = root_dir.to_str().unwrap();
    let a = Store::init_in_group(root, "web01/lineage-0", BLOCK, Some(&key))
        .await
        .unwrap();
    let b = Store::init_in_group(root, "web02/lineage-0", BLOCK, Some(&key))
        .await
        .unwrap();
    // Two machines cloned from one template: their blocks are stored once.
    let mut rng = Rng::new(7);
    let mut template = vec![0u8; 256 * BLOCK as usize];
    rng.fill(&mut template);
    let image = d.join("template.img");
    std::fs::write(&image, &template).unwrap();
    commit(&a, &image).await;
    let once = shared_chunk_bytes(&root_dir);
    assert!(once >= template.len() as u64, "{once}");
    commit(&b, &image).await;
    assert_eq!(shared_chunk_bytes(&root_dir), once, "stored twice");
    // web02 diverges: only what it writes is new.
    let mut b2 = template.clone();
    for k in 0..16 {
        rng.fill(&mut b2[k * 16 * BLOCK as usize..][..BLOCK as usize]);
    }
    std::fs::write(&image, &b2).unwrap();
    commit(&b, &image).await;
    let grown = shared_chunk_bytes(&root_dir) - once;
    assert!(
        (16 * BLOCK..=17 * BLOCK).contains(&grown),
        "{grown} new bytes for 16 new blocks"
    );
    // A collection in web01's store keeps what web02 names, though web01 names none of it.
    a.gc(&NoProgress).await.unwrap();
    assert!(export(&b, d, PointId(2)).await.unwrap() == b2);
    assert!(export(&b, d, PointId(1)).await.unwrap() == template);
    assert!(export(&a, d, PointId(1)).await.unwrap() == template);
    // web01's store goes: its points and nodes, and its record; the chunks stay for web02.
    let gone = root_dir.join("web01/lineage-0");
    Store::destroy(gone.to_str().unwrap()).await.unwrap();
    assert!(walk(&gone).is_empty(), "{:?}", walk(&gone));
    assert!(
        !root_dir
            .join(".shared/members/web01/lineage-0.member")
            .exists()
    );
    b.gc(&NoProgress).await.unwrap();
    assert!(export(&b, d, PointId(1)).await.unwrap() == template);
    assert_eq!(shared_chunk_bytes(&root_dir), once + grown);
    // Once web02 keeps only its newest point, the template's versions of the 16 blocks it
    // rewrote are named by no store: collected.
    b.prune(Keep::Last(1)).await.unwrap();
    b.gc(&NoProgress).await.unwrap();
    assert!(export(&b, d, PointId(2)).await.unwrap() == b2);
    let left = shared_chunk_bytes(&root_dir);
    assert!(left < once + grown && left >= once, "{left}");
    let report = b.verify(&NoProgress).await.unwrap();
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    // A store of the group that cannot be read stops a collection, which then deletes
    // nothing: its points may name any chunk.
    let c = Store::init_in_group(root, "web03/lineage-0", BLOCK, Some(&key))
        .await
        .unwrap();
    // (Blocks of its own, which only it names.)
    let mut own = vec![0u8; 8 * BLOCK as usize];
    rng.fill(&mut own);
    let own_image = d.join("web03.img");
    std::fs::write(&own_image, &own).unwrap();
    commit(&c, &own_image).await;
    std::fs::write(
        root_dir.join("web03/lineage-0/boomerang-store.json"),
        b"not json",
    )
    .unwrap();
    b.prune(Keep::Last(1)).await.unwrap();
    let before = shared_chunk_bytes(&root_dir);
    let err = b.gc(&NoProgress).await.unwrap_err().to_string();
    assert!(
        err.contains("web03") && err.contains("nothing is collected"),
        "{err}"
    );
    assert_eq!(shared_chunk_bytes(&root_dir), before);
    // So does one whose directory is not where its record says (moved, not mounted): it is
    // not taken for a store that is gone.
    std::fs::rename(root_dir.join("web03"), d.join("web03-moved")).unwrap();
    let err = b.gc(&NoProgress).await.unwrap_err().to_string();
    assert!(
        err.contains("web03") && err.contains("nothing is collected"),
        "{err}"
    );
    assert_eq!(shared_chunk_bytes(&root_dir), before);
    // Deleted for good (and again: a deletion cut short is run again), it names nothing, and
    // the group's collection frees what only it held.
    Store::destroy_in_group(root, "web03/lineage-0")
        .await
        .unwrap();
    Store::destroy_in_group(root, "web03/lineage-0")
        .await
        .unwrap();
    let collected = Store::collect_group(root, Some(&key)).await.unwrap();
    assert!(collected.deleted_objects > 0, "{collected:?}");
    assert!(export(&b, d, PointId(2)).await.unwrap() == b2);
    // Every store of a group is sealed under one key.
    let other = DataKey::create(&d.join("other.key")).unwrap();
    let err = Store::init_in_group(root, "web04/lineage-0", BLOCK, Some(&other))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("same key file"), "{err}");
    let err = Store::init_in_group(root, "web04/lineage-0", BLOCK, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("in the clear"), "{err}");
    // A path that is not plain names is refused.
    assert!(
        Store::init_in_group(root, "../web05", BLOCK, Some(&key))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_in_one_store_of_a_group_never_races_a_commit_in_another() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let root = root.to_str().unwrap();
    let a = Store::init_in_group(root, "web01/lineage-0", BLOCK, None)
        .await
        .unwrap();
    let b = Store::init_in_group(root, "web02/lineage-0", BLOCK, None)
        .await
        .unwrap();
    // web02 holds nothing: each of its collections deletes every chunk web01 does not name
    // yet. Commits in web01 go on meanwhile, and every one of its points stays whole.
    let image = dir.path().join("disk.img");
    let mut rng = Rng::new(11);
    let mut data = vec![0u8; 512 * 1024];
    let done = Arc::new(AtomicBool::new(false));
    let ran = Arc::new(AtomicU64::new(0));
    let gcs = collect_until(b.clone(), false, done.clone(), ran.clone());
    let mut images = Vec::new();
    for _ in 0..8 {
        rng.fill(&mut data);
        std::fs::write(&image, &data).unwrap();
        commit(&a, &image).await;
        images.push(data.clone());
    }
    done.store(true, Ordering::SeqCst);
    gcs.await.unwrap();
    assert!(ran.load(Ordering::SeqCst) > 0, "no collection ran");
    for (k, want) in images.iter().enumerate() {
        let got = export(&a, dir.path(), PointId(k as u64 + 1)).await.unwrap();
        assert!(got == *want, "point {} lost chunks", k + 1);
    }
}

/// An image of `blocks` 4 KiB blocks that compress to a few bytes each, each its own (block
/// k: the 4 bytes `seed, k, k >> 8, 1` repeated), as on a disk of logs or sparse-ish data.
fn compressible(blocks: usize, seed: u8) -> Vec<u8> {
    (0..blocks)
        .flat_map(|k| [seed, k as u8, (k >> 8) as u8, 1].repeat(BLOCK as usize / 4))
        .collect()
}

async fn small_chunks_go_into_packs(store: Store, dir: &Path) {
    let image = dir.join("small.img");
    let first = compressible(300, 0);
    std::fs::write(&image, &first).unwrap();
    let report = commit(&store, &image).await;
    let usage = store.usage().await.unwrap();
    // 300 blocks in one pack and its index, not 300 objects.
    assert_eq!(usage.chunk_objects, 0, "{usage:?}");
    assert_eq!(usage.pack_objects, 2, "{usage:?}");
    assert!(export(&store, dir, report.point).await.unwrap() == first);
    // The same blocks at other places: the packs hold them already, nothing is packed again.
    let half = 150 * BLOCK as usize;
    let mut shifted = first[half..].to_vec();
    shifted.extend_from_slice(&first[..half]);
    std::fs::write(&image, &shifted).unwrap();
    let moved = commit(&store, &image).await;
    assert_eq!(store.usage().await.unwrap().pack_objects, 2);
    assert!(export(&store, dir, moved.point).await.unwrap() == shifted);
    // A second point rewrites half the blocks: a second pack.
    let mut second = first.clone();
    second[..150 * BLOCK as usize].copy_from_slice(&compressible(150, 100));
    std::fs::write(&image, &second).unwrap();
    let report2 = commit(&store, &image).await;
    assert_eq!(store.usage().await.unwrap().pack_objects, 4);
    assert!(export(&store, dir, report2.point).await.unwrap() == second);
    assert!(export(&store, dir, report.point).await.unwrap() == first);
    assert!(store.verify(&NoProgress).await.unwrap().bad.is_empty());
    // Only the second point kept: the first pack still holds chunks it names, so both stay.
    store.prune(Keep::Last(1)).await.unwrap();
    store.gc(&NoProgress).await.unwrap();
    assert_eq!(store.usage().await.unwrap().pack_objects, 4);
    assert!(export(&store, dir, report2.point).await.unwrap() == second);
    // A third point rewrites every block: nothing of the first two packs is named, and they go.
    let third = compressible(300, 200);
    std::fs::write(&image, &third).unwrap();
    let report3 = commit(&store, &image).await;
    store.prune(Keep::Last(1)).await.unwrap();
    let gc = store.gc(&NoProgress).await.unwrap();
    assert!(gc.deleted_objects >= 4, "{gc:?}");
    assert_eq!(store.usage().await.unwrap().pack_objects, 2);
    assert!(export(&store, dir, report3.point).await.unwrap() == third);
    // A flipped byte in a pack: verify names the chunk, and the export refuses.
    let packs: Vec<_> = {
        use futures::TryStreamExt;
        store
            .backend()
            .objects_at("packs/")
            .list(Some(&ObjPath::from("packs")))
            .try_collect()
            .await
            .unwrap()
    };
    let named = |suffix: &str| {
        packs
            .iter()
            .find(|m| m.location.as_ref().ends_with(suffix))
            .unwrap()
            .location
            .to_string()
    };
    flip_byte(&store, &named(".pack"), Some(10), 0x40).await;
    let report = store.verify(&NoProgress).await.unwrap();
    assert!(
        report
            .bad
            .iter()
            .any(|b| b.problem.contains("packed in packs/")),
        "a damaged pack went unseen: {:?}",
        report.bad
    );
    assert!(export(&store, dir, report3.point).await.is_err());
    // A damaged index: verify names it.
    flip_byte(&store, &named(".idx"), Some(20), 0x01).await;
    let report = store.verify(&NoProgress).await.unwrap();
    assert!(
        report.bad.iter().any(|b| b.object.ends_with(".idx")),
        "{:?}",
        report.bad
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_chunks_are_batched_into_packs_on_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    let key = DataKey::create(&dir.path().join("store.key")).unwrap();
    let local = dir.path().join("local");
    small_chunks_go_into_packs(
        Store::init_sealed(local.to_str().unwrap(), BLOCK, &key)
            .await
            .unwrap(),
        dir.path(),
    )
    .await;
    small_chunks_go_into_packs(Store::init("memory://", BLOCK).await.unwrap(), dir.path()).await;
    let root = dir.path().join("root");
    small_chunks_go_into_packs(
        Store::init_in_group(root.to_str().unwrap(), "web01/lineage-0", BLOCK, Some(&key))
            .await
            .unwrap(),
        dir.path(),
    )
    .await;
    assert!(root.join(".shared/packs").is_dir());
    if azurite() {
        let loc = format!("azure://{}/packs", unique("packs"));
        small_chunks_go_into_packs(
            Store::init_sealed(&loc, BLOCK, &key).await.unwrap(),
            dir.path(),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_an_earlier_version_is_read_and_written_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().join("v1");
    Store::init(loc.to_str().unwrap(), BLOCK).await.unwrap();
    // The config as version 1 wrote it: no features, so no packs.
    let config = loc.join("boomerang-store.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    assert_eq!(v["version"], 4, "{v}");
    assert_eq!(v["features"], serde_json::json!(["packs"]), "{v}");
    v["version"] = 1.into();
    v.as_object_mut().unwrap().remove("features");
    std::fs::write(&config, serde_json::to_vec(&v).unwrap()).unwrap();
    let store = Store::open(loc.to_str().unwrap()).await.unwrap();
    let image = dir.path().join("small.img");
    let data = compressible(64, 9);
    std::fs::write(&image, &data).unwrap();
    let report = commit(&store, &image).await;
    let usage = store.usage().await.unwrap();
    assert_eq!(
        (usage.pack_objects, usage.chunk_objects),
        (0, 64),
        "{usage:?}"
    );
    assert!(export(&store, dir.path(), report.point).await.unwrap() == data);
    // A feature this Boomerang does not know: refused, never half read.
    v["version"] = 4.into();
    v["features"] = serde_json::json!(["packs", "from-the-future"]);
    std::fs::write(&config, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = Store::open(loc.to_str().unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("upgrade Boomerang"), "{err}");
}
