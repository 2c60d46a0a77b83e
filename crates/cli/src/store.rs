//! `boomerang store ...`: offline verbs on a replica store.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use boomerang_core::{DiskName, PointId};
use boomerang_store::{CommitOptions, DataKey, Keep, MarkKind, PointManifest, Store};
use clap::{Subcommand, ValueEnum};
use serde::Serialize;

use crate::output::{Bar, Output, Table, bytes, parse_size, print_json};

/// `boomerang store`: the verb, and the key of a sealed store.
#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// The key file of a sealed store (made by `store init --sealed`).
    #[arg(long, global = true, env = "BOOMERANG_STORE_KEY_FILE")]
    key_file: Option<PathBuf>,
    #[command(subcommand)]
    command: StoreCommand,
}

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Create a store in a directory or at azure://container/prefix.
    Init {
        store: String,
        /// Block size: a power of two from 4KiB to 4MiB.
        #[arg(long, default_value = "64KiB", value_parser = parse_size)]
        block_size: u64,
        /// Seal its chunks and nodes (encryption at rest) under the key in --key-file, which
        /// is made if it does not exist. The store never holds the key: back the file up.
        #[arg(long, requires = "key_file")]
        sealed: bool,
    },
    /// Hash an image and store the blocks that differ from the disk's latest point.
    Commit {
        store: String,
        #[arg(long)]
        disk: DiskName,
        #[arg(long)]
        image: PathBuf,
        #[arg(long, default_value = "crash")]
        mark: MarkKind,
    },
    /// List recovery points.
    Points {
        store: String,
        #[arg(long)]
        disk: Option<DiskName>,
    },
    /// Write a disk as it was at a point.
    Export {
        store: String,
        #[arg(long)]
        disk: DiskName,
        /// A point id, or `latest`.
        #[arg(long, default_value = "latest")]
        point: PointArg,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Raw)]
        format: Format,
    },
    /// Byte ranges that differ between two points of a disk.
    Diff {
        store: String,
        #[arg(long)]
        disk: DiskName,
        from: PointArg,
        to: PointArg,
    },
    /// Check every object against its hash; exits 3 if anything is damaged.
    Verify { store: String },
    /// Drop points outside the retention (the newest point of each disk is always kept).
    Prune {
        store: String,
        /// A count of points per disk (24) or an age (24h, 90m, 7d).
        #[arg(long)]
        keep: Keep,
    },
    /// Delete chunks and nodes that no point references.
    Gc { store: String },
    /// Count the objects the store holds and their bytes (for a store in a group, the
    /// chunks are the group's: blocks its stores hold alike count once).
    Usage { store: String },
    /// Make a new key file for sealed stores (never overwriting one), and print its id.
    Keygen { file: PathBuf },
}

/// `latest` or a point id.
#[derive(Clone, Copy, Debug)]
pub struct PointArg(Option<PointId>);

impl std::str::FromStr for PointArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "latest" {
            return Ok(PointArg(None));
        }
        s.parse().map(|p| PointArg(Some(p))).map_err(|_| {
            format!("{s:?} is not a point: use a point id from `boomerang store points`, or latest")
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
    Vmdk,
    /// Fixed VHD, as Azure wants it.
    Vhd,
}

/// Opens `store` with the key in `key_file`, if one is given.
async fn open(store: &str, key_file: &Option<PathBuf>) -> anyhow::Result<Store> {
    let key = key_file.as_deref().map(DataKey::read).transpose()?;
    Ok(Store::open_with_key(store, key.as_ref()).await?)
}

/// Runs a verb; returns the exit code.
pub async fn run(args: StoreArgs, output: Output) -> anyhow::Result<i32> {
    let bar = Bar::new(output);
    let key_file = args.key_file;
    match args.command {
        StoreCommand::Keygen { file } => {
            let key = DataKey::create(&file)?;
            if output == Output::Json {
                print_json(&serde_json::json!({ "key_file": file, "key_id": key.id() }))?;
            } else {
                println!(
                    "made key {} in {}: back that file up; without it, what is sealed under it cannot be read",
                    key.id(),
                    file.display()
                );
            }
        }
        StoreCommand::Init {
            store,
            block_size,
            sealed,
        } => {
            let key = match (&key_file, sealed) {
                (Some(path), true) if path.exists() => Some(DataKey::read(path)?),
                (Some(path), true) => Some(DataKey::create(path)?),
                (Some(path), false) => anyhow::bail!(
                    "a key file is given ({}): give --sealed to seal the new store under it, or give no key file (--key-file, BOOMERANG_STORE_KEY_FILE) for a store in the clear",
                    path.display()
                ),
                (None, _) => None,
            };
            let s = match &key {
                Some(key) => Store::init_sealed(&store, block_size, key).await?,
                None => Store::init(&store, block_size).await?,
            };
            if output == Output::Json {
                print_json(&serde_json::json!({ "store": s.display(), "config": s.config() }))?;
            } else {
                println!(
                    "created store {} with {} blocks",
                    s.display(),
                    bytes(block_size)
                );
                if let (Some(key), Some(path)) = (&key, &key_file) {
                    println!(
                        "sealed under key {} in {}: back that file up; without it the store cannot be read",
                        key.id(),
                        path.display()
                    );
                }
            }
        }
        StoreCommand::Commit {
            store,
            disk,
            image,
            mark,
        } => {
            let s = open(&store, &key_file).await?;
            let options = CommitOptions { mark, seq: None };
            let r = s.commit_image(&disk, &image, options, &bar).await?;
            if output == Output::Json {
                print_json(&r)?;
            } else {
                println!(
                    "point {} of disk {}: read {}, {} blocks changed ({}), stored {} in {:.2} s",
                    r.point,
                    r.disk,
                    bytes(r.stats.bytes_read),
                    r.stats.blocks_changed,
                    bytes(r.stats.bytes_changed),
                    bytes(r.stats.bytes_stored),
                    r.elapsed_ms as f64 / 1000.0
                );
            }
        }
        StoreCommand::Points { store, disk } => {
            let s = open(&store, &key_file).await?;
            let points = s.points(disk.as_ref()).await?;
            if output == Output::Json {
                print_json(&points)?;
            } else if points.is_empty() {
                println!("no points in {}", s.display());
            } else {
                let mut t = Table::new(&[
                    "DISK", "POINT", "CREATED", "MARK", "SIZE", "CHANGED", "STORED",
                ]);
                for p in &points {
                    t.row(vec![
                        p.disk.to_string(),
                        p.id.to_string(),
                        format_time(p.created_unix_ms),
                        p.mark.to_string(),
                        bytes(p.size),
                        bytes(p.stats.bytes_changed),
                        bytes(p.stats.bytes_stored),
                    ]);
                }
                t.print();
            }
        }
        StoreCommand::Export {
            store,
            disk,
            point,
            out,
            format,
        } => {
            let s = open(&store, &key_file).await?;
            let p = s.point(&disk, point.0).await?;
            let r = export(&s, &p, &out, format, &bar).await?;
            if output == Output::Json {
                print_json(&serde_json::json!({ "export": r, "format": format, "out": out }))?;
            } else {
                println!(
                    "exported disk {} at point {} to {} ({:?}): {} of data, {} sparse, {:.2} s",
                    r.disk,
                    r.point,
                    out.display(),
                    format,
                    bytes(r.bytes_written),
                    bytes(r.bytes_sparse),
                    r.elapsed_ms as f64 / 1000.0
                );
            }
        }
        StoreCommand::Diff {
            store,
            disk,
            from,
            to,
        } => {
            let s = open(&store, &key_file).await?;
            let a = s.point(&disk, from.0).await?;
            let b = s.point(&disk, to.0).await?;
            let ranges = s.diff(&a, &b).await?;
            let changed: u64 = ranges.iter().map(|r| r.len).sum();
            if output == Output::Json {
                print_json(&serde_json::json!({
                    "disk": disk, "from": a.id, "to": b.id,
                    "changed_bytes": changed, "ranges": ranges,
                }))?;
            } else {
                let mut t = Table::new(&["OFFSET", "LENGTH"]);
                for r in &ranges {
                    t.row(vec![r.offset.to_string(), r.len.to_string()]);
                }
                t.print();
                println!(
                    "{} ranges, {} changed between points {} and {} of disk {}",
                    ranges.len(),
                    bytes(changed),
                    a.id,
                    b.id,
                    disk
                );
            }
        }
        StoreCommand::Usage { store } => {
            let s = open(&store, &key_file).await?;
            let u = s.usage().await?;
            if output == Output::Json {
                print_json(&u)?;
            } else {
                println!(
                    "{} chunks ({}) and {} pack objects of small chunks ({}){}, {} nodes ({}), {} points ({})",
                    u.chunk_objects,
                    bytes(u.chunk_bytes),
                    u.pack_objects,
                    bytes(u.pack_bytes),
                    if u.group {
                        ", those of the store's whole group"
                    } else {
                        ""
                    },
                    u.node_objects,
                    bytes(u.node_bytes),
                    u.point_objects,
                    bytes(u.point_bytes)
                );
            }
        }
        StoreCommand::Verify { store } => {
            let s = open(&store, &key_file).await?;
            let r = s.verify(&bar).await?;
            if output == Output::Json {
                print_json(&r)?;
            } else {
                println!(
                    "checked {} points: {} nodes, {} chunks ({}), {} unreferenced objects",
                    r.points,
                    r.nodes_checked,
                    r.chunks_checked,
                    bytes(r.bytes_checked),
                    r.unreferenced_checked
                );
                for b in &r.bad {
                    match (&b.disk, b.point, b.offset) {
                        (Some(d), Some(p), Some(o)) => eprintln!(
                            "BAD: disk {d}, point {p}, offset {o}: {} ({})",
                            b.object, b.problem
                        ),
                        _ => eprintln!("BAD: {}: {}", b.object, b.problem),
                    }
                }
                if r.bad.is_empty() {
                    println!("store {} is intact", s.display());
                } else {
                    eprintln!(
                        "{} problems found in {}: restore the damaged objects from a copy of the store, or re-commit the affected disks",
                        r.bad.len(),
                        s.display()
                    );
                }
            }
            if !r.bad.is_empty() {
                return Ok(3);
            }
        }
        StoreCommand::Prune { store, keep } => {
            let s = open(&store, &key_file).await?;
            let r = s.prune(keep).await?;
            if output == Output::Json {
                print_json(&r)?;
            } else {
                for (d, p) in &r.removed {
                    println!("removed point {p} of disk {d}");
                }
                println!(
                    "{} points removed, {} kept; run `boomerang store gc` to free their space",
                    r.removed.len(),
                    r.kept
                );
            }
        }
        StoreCommand::Gc { store } => {
            let s = open(&store, &key_file).await?;
            let r = s.gc(&bar).await?;
            if output == Output::Json {
                print_json(&r)?;
            } else {
                println!(
                    "{} points hold {} objects; deleted {} objects ({})",
                    r.points,
                    r.live_objects,
                    r.deleted_objects,
                    bytes(r.deleted_bytes)
                );
            }
        }
    }
    Ok(0)
}

/// Exports a point; formats other than raw go through `qemu-img convert`.
pub async fn export(
    store: &Store,
    point: &PointManifest,
    out: &Path,
    format: Format,
    bar: &Bar,
) -> anyhow::Result<boomerang_store::ExportReport> {
    if format == Format::Raw {
        return Ok(store.export_raw(point, out, bar).await?);
    }
    let mut raw_name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    raw_name.push(".raw.partial");
    let raw = out.with_file_name(raw_name);
    let report = store.export_raw(point, &raw, bar).await?;
    let mut partial_name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    partial_name.push(".partial");
    let partial = out.with_file_name(partial_name);
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-q", "-f", "raw", "-O"]);
    match format {
        Format::Qcow2 => cmd.arg("qcow2"),
        Format::Vmdk => cmd.arg("vmdk"),
        Format::Vhd => cmd.args(["vpc", "-o", "subformat=fixed,force_size=on"]),
        Format::Raw => unreachable!("raw is handled above"),
    };
    cmd.arg(&raw).arg(&partial);
    let status = cmd.status();
    let _ = std::fs::remove_file(&raw);
    let status = status.context(
        "could not run qemu-img, which converts exports to qcow2, vmdk and vhd: install qemu-utils, or export raw",
    )?;
    if !status.success() {
        let _ = std::fs::remove_file(&partial);
        bail!("qemu-img convert to {format:?} failed ({status}): see its message above");
    }
    std::fs::rename(&partial, out).with_context(|| {
        format!(
            "could not rename {} to {}",
            partial.display(),
            out.display()
        )
    })?;
    Ok(report)
}

fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_utc_dates() {
        assert_eq!(super::format_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(
            super::format_time(1_764_000_000_000),
            "2025-11-24 16:00:00Z"
        );
    }
}
