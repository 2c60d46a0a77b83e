//! Range commit: a point made from the previous one and the list of changed blocks is the same
//! tree, byte for byte, as a full scan of the same image would make, and exports the image.

use std::os::unix::fs::FileExt;
use std::path::Path;

use boomerang_core::DiskName;
use boomerang_core::sample::XorShift as Rng;
use boomerang_store::{CommitOptions, NoProgress, Store};

const BLOCK: u64 = 4096;

fn disk() -> DiskName {
    DiskName::new("db").unwrap()
}

fn random_block(rng: &mut Rng) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK as usize];
    rng.fill(&mut block);
    block
}

async fn store(dir: &Path, name: &str) -> Store {
    Store::init(dir.join(name).to_str().unwrap(), BLOCK)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_range_commit_builds_the_tree_a_full_scan_builds() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    // 1,000 blocks and a short tail block: a tree of depth 2 with four level-1 nodes.
    let size = 1000 * BLOCK + 1536;
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(size).unwrap();
    let mut rng = Rng::new(7);
    for i in (0..1000).step_by(3) {
        file.write_all_at(&random_block(&mut rng), i * BLOCK)
            .unwrap();
    }
    let ranged = store(dir.path(), "ranged").await;
    ranged
        .commit_image(&disk(), &image, CommitOptions::default(), &NoProgress)
        .await
        .unwrap();

    for round in 0..4u64 {
        // Rewrite some blocks, zero others (a whole level-1 node in round 2), leave some the
        // same, and list a few that did not change at all.
        let mut changed = Vec::new();
        for _ in 0..40 {
            let i = rng.next_u64() % 1000;
            file.write_all_at(&random_block(&mut rng), i * BLOCK)
                .unwrap();
            changed.push(i);
        }
        if round == 2 {
            for i in 256..512 {
                file.write_all_at(&[0u8; BLOCK as usize], i * BLOCK)
                    .unwrap();
                changed.push(i);
            }
        }
        file.write_all_at(&[0xEE; 1536], 1000 * BLOCK).unwrap();
        changed.extend([1000, 999, 5, 5]);
        let report = ranged
            .commit_blocks(
                &disk(),
                &image,
                changed.iter().rev().copied(),
                CommitOptions::default(),
            )
            .await
            .unwrap();
        assert!(report.stats.bytes_read <= (changed.len() as u64) * BLOCK);

        // The same image, scanned whole into a store of its own.
        let full = store(dir.path(), &format!("full{round}")).await;
        let scanned = full
            .commit_image(&disk(), &image, CommitOptions::default(), &NoProgress)
            .await
            .unwrap();
        let a = ranged.point(&disk(), Some(report.point)).await.unwrap();
        let b = full.point(&disk(), Some(scanned.point)).await.unwrap();
        assert_eq!(a.root, b.root, "round {round}: the same tree");

        let out = dir.path().join(format!("export{round}.img"));
        ranged.export_raw(&a, &out, &NoProgress).await.unwrap();
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&image).unwrap(),
            "round {round}: the point exports the image"
        );
    }
    let report = ranged.verify(&NoProgress).await.unwrap();
    assert!(report.bad.is_empty(), "{report:?}");

    // A new size: a full scan, not a range commit.
    file.set_len(size + 64 * BLOCK).unwrap();
    let grown = ranged
        .commit_blocks(&disk(), &image, [0], CommitOptions::default())
        .await
        .unwrap();
    assert_eq!(grown.stats.bytes_read, size + 64 * BLOCK);
}

#[tokio::test]
async fn a_full_scan_skips_holes_and_still_stores_the_image_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    // 48 MiB: more than the readers' recycled buffers hold, so buffers that held data come
    // back for batches that are mostly holes. Data in runs that start and end inside blocks.
    let size = 48u64 << 20;
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(size).unwrap();
    let mut rng = Rng::new(3);
    let mut runs = vec![(0u64, 20u64 << 20)];
    for k in 0..12u64 {
        runs.push(((20 << 20) + k * (2 << 20) + 1000, 5000 + k * 777));
    }
    runs.push((size - 3000, 3000));
    for &(at, len) in &runs {
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        file.write_all_at(&data, at).unwrap();
    }
    let s = store(dir.path(), "sparse").await;
    let report = s
        .commit_image(&disk(), &image, CommitOptions::default(), &NoProgress)
        .await
        .unwrap();
    let point = s.points(Some(&disk())).await.unwrap().remove(0);
    let out = dir.path().join("out.img");
    s.export_raw(&point, &out, &NoProgress).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&image).unwrap());
    // Every data block was counted as changed, and nothing else.
    let blocks: u64 = runs
        .iter()
        .map(|&(at, len)| (at + len).div_ceil(BLOCK) - at / BLOCK)
        .sum();
    assert_eq!(report.stats.blocks_changed, blocks, "{:?}", report.stats);
}

/// Says stop once `after` calls to `advance` have been made.
struct StopAfter {
    after: usize,
    seen: std::sync::atomic::AtomicUsize,
}

impl boomerang_store::Progress for StopAfter {
    fn advance(&self, _n: u64) {
        self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn stopped(&self) -> bool {
        self.seen.load(std::sync::atomic::Ordering::Relaxed) >= self.after
    }
}

#[tokio::test]
async fn a_stopped_commit_writes_no_point_and_lets_the_next_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    // 64 MiB of data: read in several batches, so the stop comes in the middle.
    let file = std::fs::File::create(&image).unwrap();
    let mut rng = Rng::new(11);
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..64u64 {
        rng.fill(&mut chunk);
        file.write_all_at(&chunk, i << 20).unwrap();
    }
    let store = store(dir.path(), "s").await;
    let stop = StopAfter {
        after: 1,
        seen: Default::default(),
    };
    let stopped = store
        .commit_blocks_with(&disk(), &image, [], CommitOptions::default(), &stop)
        .await
        .expect_err("a full commit stopped after its first batch");
    assert!(
        matches!(&stopped, boomerang_store::StoreError::Interrupted { disk: d } if *d == disk()),
        "{stopped}"
    );
    assert!(stopped.to_string().contains("disk db"), "{stopped}");
    assert!(store.latest(&disk()).await.unwrap().is_none(), "no point");
    // The commit let go of its lease: the next one runs at once, and reads back whole.
    let report = store
        .commit_image(&disk(), &image, CommitOptions::default(), &NoProgress)
        .await
        .unwrap();
    let out = dir.path().join("out.img");
    let point = store.point(&disk(), Some(report.point)).await.unwrap();
    store.export_raw(&point, &out, &NoProgress).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&image).unwrap());

    // A range commit stops between blocks too, and the latest point stays as it was.
    file.write_all_at(&[7u8; BLOCK as usize], 0).unwrap();
    let at_once = StopAfter {
        after: 0,
        seen: Default::default(),
    };
    let stopped = store
        .commit_blocks_with(&disk(), &image, [0], CommitOptions::default(), &at_once)
        .await
        .expect_err("a range commit stopped before its first block");
    assert!(matches!(
        stopped,
        boomerang_store::StoreError::Interrupted { .. }
    ));
    assert_eq!(
        store.latest(&disk()).await.unwrap().unwrap().id,
        report.point
    );
}
