//! `boomerang quickstart`: a sample disk under a write workload, committed point after point
//! into a local store, then an older point exported and checked byte for byte.
//!
//! First version of the all-in-one tour: later issues add the agent, the process server and
//! master target, failover, reprotect and failback.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use boomerang_core::DiskName;
use boomerang_core::sample::XorShift as Rng;
use boomerang_store::{CommitOptions, MarkKind, NoProgress, Store};
use serde::Serialize;

use crate::output::{Bar, Output, bytes, print_json};

#[derive(clap::Args, Debug)]
pub struct QuickstartArgs {
    /// Work in this directory (kept afterwards) instead of a temporary one.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size of the sample disk.
    #[arg(long, default_value = "256MiB", value_parser = crate::output::parse_size)]
    disk_size: u64,
    /// Recovery points to commit while the workload runs.
    #[arg(long, default_value_t = 6)]
    points: u32,
}

#[derive(Serialize)]
struct Summary {
    dir: PathBuf,
    disk_size: u64,
    points: u32,
    bytes_written_by_workload: u64,
    bytes_changed: u64,
    bytes_stored: u64,
    verified_point: u64,
    verified: bool,
    store_intact: bool,
    elapsed_ms: u64,
}

const BLOCK: u64 = 4096;

pub async fn run(args: QuickstartArgs, output: Output) -> anyhow::Result<i32> {
    let started = Instant::now();
    if args.disk_size < 1 << 20 || args.disk_size % BLOCK != 0 {
        bail!("--disk-size must be at least 1MiB and a multiple of 4KiB");
    }
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .with_context(|| format!("could not create {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = TempDir::new()?;
            temp.0.clone()
        }
    };
    let human = output == Output::Human;
    let say = |s: String| {
        if human {
            println!("{s}");
        }
    };
    let site_a = dir.join("site-a");
    let site_b = dir.join("site-b");
    std::fs::create_dir_all(&site_a).context("could not create the site A directory")?;
    let image = site_a.join("web-01-disk0.img");
    let store_dir = site_b.join("replica-store");
    let disk = DiskName::new("web-01-disk0")?;

    say(format!("Boomerang quickstart in {}", dir.display()));
    say(format!(
        "  site A (protected machine): {}",
        site_a.display()
    ));
    say(format!(
        "  site B (replica store):     {}",
        store_dir.display()
    ));
    let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
    make_sample_disk(&image, args.disk_size, &mut rng)?;
    say(format!(
        "[1/4] created sample disk {} ({})",
        image.display(),
        bytes(args.disk_size)
    ));

    let store = Store::init(
        store_dir
            .to_str()
            .context("the directory path is not UTF-8")?,
        64 * 1024,
    )
    .await?;
    let bar = Bar::new(output);
    let verify_at = (args.points / 2).max(1);
    let copy = dir.join("copy-at-point.img");
    let mut summary = Summary {
        dir: dir.clone(),
        disk_size: args.disk_size,
        points: args.points,
        bytes_written_by_workload: 0,
        bytes_changed: 0,
        bytes_stored: 0,
        verified_point: 0,
        verified: false,
        store_intact: false,
        elapsed_ms: 0,
    };
    say(format!(
        "[2/4] replicating: {} points, the workload writes between them (frozen while a point is cut)",
        args.points
    ));
    for n in 1..=args.points {
        if n > 1 {
            summary.bytes_written_by_workload += workload(&image, args.disk_size, &mut rng)?;
        }
        let mark = if n % 3 == 0 {
            MarkKind::App
        } else {
            MarkKind::Crash
        };
        let r = store
            .commit_image(&disk, &image, CommitOptions { mark, seq: None }, &bar)
            .await?;
        summary.bytes_changed += r.stats.bytes_changed;
        summary.bytes_stored += r.stats.bytes_stored;
        if n == verify_at {
            std::fs::copy(&image, &copy).context("could not copy the sample disk")?;
            summary.verified_point = r.point.0;
        }
        say(format!(
            "      point {} ({}): {} blocks changed, {} changed, {} stored",
            r.point,
            mark,
            r.stats.blocks_changed,
            bytes(r.stats.bytes_changed),
            bytes(r.stats.bytes_stored)
        ));
    }

    let point = store
        .point(&disk, Some(boomerang_core::PointId(summary.verified_point)))
        .await?;
    let exported = dir.join("exported-point.img");
    store.export_raw(&point, &exported, &bar).await?;
    summary.verified = same_content(&exported, &copy)?;
    say(format!(
        "[3/4] exported point {} and compared it with the copy taken then: {}",
        point.id,
        if summary.verified {
            "identical"
        } else {
            "DIFFERENT"
        }
    ));

    let report = store.verify(&NoProgress).await?;
    summary.store_intact = report.bad.is_empty();
    say(format!(
        "[4/4] verified the store: {} chunks and {} nodes checked, {}",
        report.chunks_checked,
        report.nodes_checked,
        if summary.store_intact {
            "all intact"
        } else {
            "DAMAGE FOUND"
        }
    ));
    summary.elapsed_ms = started.elapsed().as_millis() as u64;

    if output == Output::Json {
        print_json(&summary)?;
    } else {
        println!();
        println!("Summary");
        println!("  points committed:        {}", summary.points);
        println!(
            "  written by the workload: {}",
            bytes(summary.bytes_written_by_workload)
        );
        println!(
            "  changed blocks (total):  {}",
            bytes(summary.bytes_changed)
        );
        println!("  stored (compressed):     {}", bytes(summary.bytes_stored));
        println!(
            "  verification:            {}",
            if summary.verified && summary.store_intact {
                "PASSED"
            } else {
                "FAILED"
            }
        );
        println!(
            "  time:                    {:.1} s",
            summary.elapsed_ms as f64 / 1000.0
        );
    }
    Ok(if summary.verified && summary.store_intact {
        0
    } else {
        4
    })
}

/// A disk that looks used: a third of it data (half compressible), the rest never written.
fn make_sample_disk(path: &Path, size: u64, rng: &mut Rng) -> anyhow::Result<()> {
    let file =
        File::create(path).with_context(|| format!("could not create {}", path.display()))?;
    file.set_len(size)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(buf.len() as u64) as usize;
        match rng.next_u64() % 6 {
            0 => rng.fill(&mut buf[..len]),
            1 => buf[..len]
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i / 512) as u8),
            _ => {
                offset += len as u64;
                continue;
            }
        }
        file.write_all_at(&buf[..len], offset)?;
        offset += len as u64;
    }
    file.sync_all()?;
    Ok(())
}

/// Random 4 KiB writes (some repeated on hot blocks); returns the bytes written.
fn workload(path: &Path, size: u64, rng: &mut Rng) -> anyhow::Result<u64> {
    let file = OpenOptions::new().write(true).open(path)?;
    let mut buf = vec![0u8; BLOCK as usize];
    let writes = 400;
    let hot = size / BLOCK / 100;
    for i in 0..writes {
        rng.fill(&mut buf);
        let block = if i % 4 == 0 {
            rng.next_u64() % hot.max(1)
        } else {
            rng.next_u64() % (size / BLOCK)
        };
        file.write_all_at(&buf, block * BLOCK)?;
    }
    file.sync_all()?;
    Ok(writes * BLOCK)
}

fn same_content(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let mut fa = File::open(a).with_context(|| format!("could not open {}", a.display()))?;
    let mut fb = File::open(b).with_context(|| format!("could not open {}", b.display()))?;
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let base =
            std::env::temp_dir().join(format!("boomerang-quickstart-{}", std::process::id()));
        std::fs::create_dir_all(&base)
            .with_context(|| format!("could not create {}", base.display()))?;
        Ok(TempDir(base))
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
