//! Durable state: one SQLite database (`<state_dir>/gateway.db`, bundled
//! SQLite, WAL) with a row per sandbox.
//!
//! A row holds the sandbox's id, name, driver, public spec, labels, the
//! persisted phase (which carries the gateway's intent: Stopping, Stopped,
//! Starting, Deleting), the driver's last observed status, the gateway's
//! own condition, and a resource version bumped on every change. Schema
//! changes are numbered migrations applied in order at open; the applied
//! number is SQLite's `user_version`.
//!
//! All methods block; async callers run them on the blocking pool. Writes
//! go through one connection (so read-modify-write in [`Store::update`] is a
//! single serialised transaction); reads use a second one and never wait
//! for a writer (WAL); public watches read through connections of their
//! own ([`WATCH_READERS`]), so they never queue in front of requests.
//!
//! Every committed change gets the next number of one sequence (`seq`):
//! a row carries the number of its last change, a deleted row leaves a
//! tombstone with the number of its deletion, and the [`Feed`] hands the
//! changes to public watches in commit order. A watch that fell behind the
//! feed catches up from the rows and tombstones numbered after the last
//! change it sent ([`Store::changes_since`]).
//!
//! Rows that cannot be read (an undecodable spec or status, labels that are
//! not JSON, an unknown phase) are moved to `quarantined_sandboxes` when
//! the database is opened, and logged, so one bad row cannot stop the
//! gateway from starting.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use openshell_proto::compute::v1::DriverSandboxStatus;
use openshell_proto::gateway::v1::{self as gw, SandboxPhase};
use prost::Message as _;
use rusqlite::types::{Type, Value};
use rusqlite::{Connection, OptionalExtension as _, params};

use crate::error::{Error, Result};
use crate::phases::{phase_from_name, phase_name};

/// Schema migrations, applied in order; entry `i` brings the database to
/// version `i + 1`. Never edit an entry once released: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: sandboxes and their labels.
    r"
    CREATE TABLE sandboxes (
        id                TEXT PRIMARY KEY NOT NULL,
        name              TEXT NOT NULL UNIQUE,
        driver            TEXT NOT NULL,
        spec              BLOB NOT NULL,
        labels            TEXT NOT NULL,
        phase             TEXT NOT NULL,
        observed          BLOB,
        gateway_condition BLOB,
        instance_id       TEXT NOT NULL,
        resource_version  INTEGER NOT NULL,
        created_at_ms     INTEGER NOT NULL,
        updated_at_ms     INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX sandboxes_by_driver ON sandboxes (driver, name);
    CREATE INDEX sandboxes_by_phase ON sandboxes (phase, name);
    CREATE TABLE sandbox_labels (
        sandbox_id TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
        key        TEXT NOT NULL,
        value      TEXT NOT NULL,
        PRIMARY KEY (sandbox_id, key)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX sandbox_labels_by_pair ON sandbox_labels (key, value);
    ",
    // 2: change numbers, tombstones of deleted rows, quarantined rows.
    r"
    ALTER TABLE sandboxes ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    UPDATE sandboxes SET seq = rowid;
    CREATE INDEX sandboxes_by_seq ON sandboxes (seq);
    CREATE INDEX sandboxes_by_driver_seq ON sandboxes (driver, seq);
    CREATE TABLE tombstones (
        seq           INTEGER PRIMARY KEY NOT NULL,
        id            TEXT NOT NULL,
        name          TEXT NOT NULL,
        driver        TEXT NOT NULL,
        deleted_at_ms INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE quarantined_sandboxes (
        id, name, driver, spec, labels, phase, observed, gateway_condition,
        instance_id, resource_version, created_at_ms, updated_at_ms, seq,
        reason            TEXT NOT NULL,
        quarantined_at_ms INTEGER NOT NULL
    );
    ",
];

/// Read connections reserved for public watches.
pub const WATCH_READERS: usize = 2;

/// The feed keeps at most this many changes...
const FEED_ENTRIES: usize = 8192;
/// ...and about this many bytes of them; a watch further behind catches
/// up from the database.
const FEED_BYTES: usize = 8 * 1024 * 1024;

/// Tombstones kept for watches catching up; a watch behind by more
/// deletions than this cannot catch up and is ended.
const TOMBSTONES_KEPT: u64 = 10_000;
/// Tombstones beyond [`TOMBSTONES_KEPT`] are pruned every this many
/// deletions.
const TOMBSTONE_PRUNE_EVERY: u64 = 1024;

/// The schema version this build writes.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// One stored sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRow {
    pub id: String,
    pub name: String,
    pub driver: String,
    pub spec: gw::SandboxSpec,
    pub labels: BTreeMap<String, String>,
    pub phase: SandboxPhase,
    /// The driver's last reported status.
    pub observed: Option<DriverSandboxStatus>,
    /// Replaces the driver's `Ready` condition while set (the gateway's own
    /// transitions and errors).
    pub gateway_condition: Option<gw::Condition>,
    pub instance_id: String,
    pub resource_version: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// Filters and position of a list query.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub driver: Option<String>,
    pub phase: Option<SandboxPhase>,
    pub labels: Vec<(String, String)>,
    /// Only this name.
    pub name: Option<String>,
    /// Only names after this one (exclusive), for paging.
    pub after_name: Option<String>,
    pub limit: usize,
    /// The page also ends before the row that would take the stored size of
    /// its rows past this many bytes (0: no such bound). A page holds at
    /// least one row.
    pub max_bytes: usize,
}

/// A committed change, as the [`Feed`] carries it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The row as the change left it (inserted or updated).
    Upsert(Box<SandboxRow>),
    Deleted {
        id: String,
        name: String,
        driver: String,
    },
}

impl Change {
    pub fn driver(&self) -> &str {
        match self {
            Self::Upsert(row) => &row.driver,
            Self::Deleted { driver, .. } => driver,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Upsert(row) => &row.name,
            Self::Deleted { name, .. } => name,
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Self::Upsert(row) => &row.id,
            Self::Deleted { id, .. } => id,
        }
    }

    /// About what the change costs to keep.
    fn weight(&self) -> usize {
        match self {
            Self::Upsert(row) => row_weight(row),
            Self::Deleted { id, name, driver } => 64 + id.len() + name.len() + driver.len(),
        }
    }
}

/// About how many bytes a row takes, stored or sent.
pub fn row_weight(row: &SandboxRow) -> usize {
    use prost::Message as _;
    256 + row.id.len()
        + row.name.len()
        + row.driver.len()
        + row.instance_id.len()
        + row.spec.encoded_len()
        + row
            .labels
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>()
        + row.observed.as_ref().map_or(0, prost::Message::encoded_len)
        + row
            .gateway_condition
            .as_ref()
            .map_or(0, prost::Message::encoded_len)
}

/// One numbered change.
#[derive(Debug, Clone)]
pub struct FeedEntry {
    pub seq: u64,
    pub change: Arc<Change>,
    /// The change as public watches send it, encoded once by the first
    /// watch that sends it and shared by the others, with the driver
    /// availability condition it was made with.
    pub encoded: Arc<SharedEncoding>,
}

/// See [`FeedEntry::encoded`].
pub type SharedEncoding = std::sync::OnceLock<(Option<gw::Condition>, Arc<[u8]>)>;

/// What [`Feed::since`] found.
#[derive(Debug)]
pub enum Since {
    /// The changes after the cursor, oldest first (empty: none yet).
    Entries(Vec<FeedEntry>),
    /// Changes after the cursor were dropped from the feed already: catch
    /// up from the database.
    Lagged,
}

#[derive(Debug)]
struct Ring {
    entries: VecDeque<(FeedEntry, usize)>,
    bytes: usize,
    /// Every change numbered up to here has left the ring (or predates it).
    floor: u64,
}

/// The committed changes, in commit order, for public watches: a bounded
/// ring (by count and bytes) that every watch reads at its own pace. A
/// watch holds only its position; one that falls behind the ring catches
/// up from the database.
#[derive(Debug)]
pub struct Feed {
    ring: Mutex<Ring>,
    head: tokio::sync::watch::Sender<u64>,
}

impl Feed {
    fn new(head: u64) -> Self {
        Self {
            ring: Mutex::new(Ring {
                entries: VecDeque::new(),
                bytes: 0,
                floor: head,
            }),
            head: tokio::sync::watch::Sender::new(head),
        }
    }

    fn ring(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends committed changes (called in commit order).
    fn push(&self, changes: Vec<(u64, Change)>) {
        let Some(last) = changes.last().map(|(seq, _)| *seq) else {
            return;
        };
        {
            let mut ring = self.ring();
            for (seq, change) in changes {
                // Twice the change: its shared encoding, once a watch has
                // sent it, is about as large.
                let weight = change.weight() * 2;
                ring.bytes += weight;
                ring.entries.push_back((
                    FeedEntry {
                        seq,
                        change: Arc::new(change),
                        encoded: Arc::default(),
                    },
                    weight,
                ));
            }
            while ring.entries.len() > 1
                && (ring.entries.len() > FEED_ENTRIES || ring.bytes > FEED_BYTES)
            {
                if let Some((entry, weight)) = ring.entries.pop_front() {
                    ring.bytes -= weight;
                    ring.floor = entry.seq;
                }
            }
        }
        self.head.send_replace(last);
    }

    /// The number of the last change pushed.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Wakes whenever changes are pushed.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Up to `max` changes numbered after `cursor`, oldest first, ending
    /// early past about `max_bytes` (at least one).
    pub fn since(&self, cursor: u64, max: usize, max_bytes: usize) -> Since {
        let ring = self.ring();
        if cursor < ring.floor {
            return Since::Lagged;
        }
        let start = ring.entries.partition_point(|(e, _)| e.seq <= cursor);
        let mut bytes = 0usize;
        let mut taken = Vec::new();
        for (entry, weight) in ring.entries.iter().skip(start).take(max) {
            if !taken.is_empty() && bytes + weight > max_bytes {
                break;
            }
            bytes += weight;
            taken.push(entry.clone());
        }
        Since::Entries(taken)
    }
}

/// What [`Store::changes_since`] found.
#[derive(Debug)]
pub struct CatchUp {
    /// Current rows and deletions numbered after the cursor, oldest first.
    pub changes: Vec<(u64, Change)>,
    /// The cursor after these changes.
    pub cursor: u64,
    /// Nothing numbered after `cursor` was left when this was read.
    pub complete: bool,
}

/// A row that could not be read and was set aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    pub id: String,
    pub name: String,
    pub driver: String,
    pub reason: String,
}

/// What [`Store::insert`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    Ok,
    /// A sandbox with this name exists already (its id).
    NameTaken(String),
}

/// What [`Store::update`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Updated {
    /// The closure changed the row; this is the stored result.
    Changed(SandboxRow),
    /// The closure left the row as it was.
    Unchanged(SandboxRow),
    Missing,
}

struct Writer {
    conn: Connection,
    /// The number of the last committed change.
    seq: u64,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<Writer>,
    reader: Mutex<Connection>,
    watch_readers: Vec<Mutex<Connection>>,
    feed: Feed,
    /// Tombstones numbered up to here are gone.
    tombstone_floor: AtomicU64,
    removals: AtomicU64,
    quarantined: Vec<Quarantined>,
}

/// The sandbox store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn lock<T>(conn: &Mutex<T>) -> MutexGuard<'_, T> {
    conn.lock().unwrap_or_else(PoisonError::into_inner)
}

const COLUMNS: &str = "id, name, driver, spec, labels, phase, observed, gateway_condition, \
                       instance_id, resource_version, created_at_ms, updated_at_ms";

/// [`COLUMNS`], then `seq` (index 12), then the stored size (index 13).
const READ_COLUMNS: &str = "id, name, driver, spec, labels, phase, observed, gateway_condition, \
                            instance_id, resource_version, created_at_ms, updated_at_ms, seq, \
                            length(spec) + length(labels) + ifnull(length(observed), 0) \
                            + ifnull(length(gateway_condition), 0) + length(id) + length(name) \
                            + length(driver) + length(instance_id) + 256";

fn seq_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<u64> {
    let seq: i64 = row.get(12)?;
    u64::try_from(seq).map_err(|e| conversion(12, Type::Integer, e))
}

fn size_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<usize> {
    let size: i64 = row.get(13)?;
    Ok(usize::try_from(size).unwrap_or(usize::MAX))
}

fn conversion(
    index: usize,
    kind: Type,
    error: impl std::error::Error + Send + Sync + 'static,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(index, kind, Box::new(error))
}

fn decode_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SandboxRow> {
    let spec: Vec<u8> = row.get(3)?;
    let labels: String = row.get(4)?;
    let phase: String = row.get(5)?;
    let observed: Option<Vec<u8>> = row.get(6)?;
    let condition: Option<Vec<u8>> = row.get(7)?;
    let version: i64 = row.get(9)?;
    Ok(SandboxRow {
        id: row.get(0)?,
        name: row.get(1)?,
        driver: row.get(2)?,
        spec: gw::SandboxSpec::decode(spec.as_slice()).map_err(|e| conversion(3, Type::Blob, e))?,
        labels: serde_json::from_str(&labels).map_err(|e| conversion(4, Type::Text, e))?,
        phase: phase_from_name(&phase).ok_or_else(|| {
            conversion(
                5,
                Type::Text,
                std::io::Error::other(format!("unknown phase {phase:?}")),
            )
        })?,
        observed: observed
            .map(|b| DriverSandboxStatus::decode(b.as_slice()))
            .transpose()
            .map_err(|e| conversion(6, Type::Blob, e))?,
        gateway_condition: condition
            .map(|b| gw::Condition::decode(b.as_slice()))
            .transpose()
            .map_err(|e| conversion(7, Type::Blob, e))?,
        instance_id: row.get(8)?,
        resource_version: u64::try_from(version).map_err(|e| conversion(9, Type::Integer, e))?,
        created_at_ms: row.get(10)?,
        updated_at_ms: row.get(11)?,
    })
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn labels_json(labels: &BTreeMap<String, String>) -> String {
    // A map of strings always serialises.
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".to_owned())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    openshell_wire::time::now_millis()
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

impl Store {
    /// Opens (creating with mode 0600 if needed) and migrates the database,
    /// then sets aside rows that cannot be read.
    pub fn open(path: &Path) -> Result<Self> {
        // Never through a symlink, only a regular file of ours, 0600.
        drop(super::open_private_file(path, "database")?);
        let open = || -> Result<Connection> {
            let conn = Connection::open(path)
                .map_err(|e| Error::store(format!("open {}", path.display()), e))?;
            configure(&conn).map_err(|e| Error::store("configure the connection", e))?;
            Ok(conn)
        };
        let mut writer = open()?;
        migrate(&mut writer, path)?;
        let quarantined = quarantine(&mut writer)?;
        let seq: i64 = writer
            .query_row(
                "SELECT max(ifnull((SELECT max(seq) FROM sandboxes), 0), \
                            ifnull((SELECT max(seq) FROM tombstones), 0))",
                [],
                |r| r.get(0),
            )
            .map_err(|e| Error::store("read the last change number", e))?;
        // No watch outlives the process, so no tombstone is needed any more.
        writer
            .execute("DELETE FROM tombstones", [])
            .map_err(|e| Error::store("clear old tombstones", e))?;
        let seq = u64::try_from(seq).unwrap_or(0);
        let reader = open()?;
        let watch_readers = (0..WATCH_READERS)
            .map(|_| open().map(Mutex::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                writer: Mutex::new(Writer { conn: writer, seq }),
                reader: Mutex::new(reader),
                watch_readers,
                feed: Feed::new(seq),
                tombstone_floor: AtomicU64::new(seq),
                removals: AtomicU64::new(0),
                quarantined,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The rows set aside when the database was opened.
    pub fn quarantined(&self) -> &[Quarantined] {
        &self.inner.quarantined
    }

    /// Committed changes, in commit order.
    pub fn feed(&self) -> &Feed {
        &self.inner.feed
    }

    /// Stores a new row; a taken name is reported, not an error.
    pub fn insert(&self, row: &SandboxRow) -> Result<Inserted> {
        self.write(|tx| tx.insert(row))
    }

    fn get_where(&self, column: &str, value: &str) -> Result<Option<SandboxRow>> {
        let conn = lock(&self.inner.reader);
        let mut statement = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM sandboxes WHERE {column} = ?1"
            ))
            .map_err(|e| Error::store("prepare a lookup", e))?;
        statement
            .query_row([value], decode_row)
            .optional()
            .map_err(|e| Error::store(format!("read sandbox {value}"), e))
    }

    pub fn get(&self, id: &str) -> Result<Option<SandboxRow>> {
        self.get_where("id", id)
    }

    pub fn get_by_name(&self, name: &str) -> Result<Option<SandboxRow>> {
        self.get_where("name", name)
    }

    /// Runs `work` in one write transaction: committed if it returns `Ok`,
    /// rolled back otherwise. What it changed reaches the feed after the
    /// commit, in commit order.
    pub fn write<T>(&self, work: impl FnOnce(&StoreTx<'_>) -> Result<T>) -> Result<T> {
        let mut guard = lock(&self.inner.writer);
        let writer = &mut *guard;
        let first = writer.seq;
        let (value, seq, changes, removed) = {
            let tx = writer
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(|e| Error::store("begin a transaction", e))?;
            let store_tx = StoreTx {
                tx,
                seq: Cell::new(first),
                changes: RefCell::new(Vec::new()),
                removed: Cell::new(0),
            };
            let value = work(&store_tx)?;
            let StoreTx {
                tx,
                seq,
                changes,
                removed,
            } = store_tx;
            tx.commit()
                .map_err(|e| Error::store("commit a transaction", e))?;
            (value, seq, changes, removed)
        };
        writer.seq = seq.get();
        self.inner.feed.push(changes.into_inner());
        let removed = removed.get();
        if removed > 0 {
            let before = self.inner.removals.fetch_add(removed, Ordering::Relaxed);
            if (before + removed) / TOMBSTONE_PRUNE_EVERY != before / TOMBSTONE_PRUNE_EVERY {
                self.prune_tombstones(&writer.conn, TOMBSTONES_KEPT);
            }
        }
        Ok(value)
    }

    /// Drops all but the newest `keep` tombstones.
    fn prune_tombstones(&self, conn: &Connection, keep: u64) {
        let pruned = (|| -> rusqlite::Result<Option<i64>> {
            let Some(upto) = conn
                .query_row(
                    "SELECT seq FROM tombstones ORDER BY seq DESC LIMIT 1 OFFSET ?1",
                    [i64::try_from(keep).unwrap_or(i64::MAX)],
                    |r| r.get::<_, i64>(0),
                )
                .optional()?
            else {
                return Ok(None);
            };
            conn.execute("DELETE FROM tombstones WHERE seq <= ?1", [upto])?;
            Ok(Some(upto))
        })();
        match pruned {
            Ok(Some(upto)) => {
                self.inner
                    .tombstone_floor
                    .fetch_max(u64::try_from(upto).unwrap_or(0), Ordering::SeqCst);
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "could not prune tombstones"),
        }
    }

    /// Read-modify-write of one row in one transaction (see
    /// [`StoreTx::update`]).
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut SandboxRow) -> bool,
    ) -> Result<Updated> {
        self.write(|tx| tx.update(id, change))
    }

    /// Deletes a row (and its labels); returns what it was.
    pub fn remove(&self, id: &str) -> Result<Option<SandboxRow>> {
        self.write(|tx| tx.remove(id))
    }

    /// One page of rows matching `query`, ordered by name, and whether more
    /// follow.
    pub fn list(&self, query: &ListQuery) -> Result<(Vec<SandboxRow>, bool)> {
        let conn = lock(&self.inner.reader);
        let (rows, more) = list_on(&conn, query)?;
        Ok((rows.into_iter().map(|(_, row)| row).collect(), more))
    }

    /// Runs `read` on a connection reserved for public watches. At most
    /// [`WATCH_READERS`] callers at a time find one free at once; more wait.
    fn watch_read<T>(&self, read: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let readers = &self.inner.watch_readers;
        for reader in readers {
            if let Ok(conn) = reader.try_lock() {
                return read(&conn);
            }
        }
        read(&lock(&readers[0]))
    }

    /// [`Self::list`] for a public watch: with each row's change number.
    pub fn list_for_watch(&self, query: &ListQuery) -> Result<(Vec<(u64, SandboxRow)>, bool)> {
        self.watch_read(|conn| list_on(conn, query))
    }

    /// The current rows, and tombstones, numbered after `cursor` (and
    /// matching the filters), oldest first: what a watch that sent every
    /// change up to `cursor` still has to send. At most `limit` rows and
    /// about `max_bytes` of them per call. `None` when tombstones the watch
    /// would need were pruned already.
    pub fn changes_since(
        &self,
        cursor: u64,
        driver: Option<&str>,
        name: Option<&str>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Option<CatchUp>> {
        let floor = &self.inner.tombstone_floor;
        if floor.load(Ordering::SeqCst) > cursor {
            return Ok(None);
        }
        let caught = self
            .watch_read(|conn| changes_on(conn, cursor, driver, name, limit.max(1), max_bytes))?;
        // Pruned while this read: the read may lack deletions.
        if floor.load(Ordering::SeqCst) > cursor {
            return Ok(None);
        }
        Ok(Some(caught))
    }

    /// Every row of one driver, ordered by name.
    pub fn rows_of_driver(&self, driver: &str) -> Result<Vec<SandboxRow>> {
        let conn = lock(&self.inner.reader);
        let mut statement = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM sandboxes WHERE driver = ?1 ORDER BY name"
            ))
            .map_err(|e| Error::store("prepare a driver query", e))?;
        statement
            .query_map([driver], decode_row)
            .and_then(Iterator::collect)
            .map_err(|e| Error::store(format!("list sandboxes of driver {driver}"), e))
    }

    /// Number of rows per driver name.
    pub fn driver_counts(&self) -> Result<Vec<(String, u64)>> {
        let conn = lock(&self.inner.reader);
        let mut statement = conn
            .prepare_cached(
                "SELECT driver, COUNT(*) FROM sandboxes GROUP BY driver ORDER BY driver",
            )
            .map_err(|e| Error::store("prepare a count", e))?;
        statement
            .query_map([], |r| {
                let count: i64 = r.get(1)?;
                Ok((r.get(0)?, u64::try_from(count).unwrap_or(0)))
            })
            .and_then(Iterator::collect)
            .map_err(|e| Error::store("count sandboxes", e))
    }

    /// Whether any row belongs to `driver`.
    pub fn has_driver(&self, driver: &str) -> Result<bool> {
        let conn = lock(&self.inner.reader);
        conn.prepare_cached("SELECT 1 FROM sandboxes WHERE driver = ?1 LIMIT 1")
            .and_then(|mut s| s.exists([driver]))
            .map_err(|e| Error::store(format!("look for sandboxes of driver {driver}"), e))
    }
}

/// One page of [`Store::list`] on `conn`, with change numbers.
fn list_on(conn: &Connection, query: &ListQuery) -> Result<(Vec<(u64, SandboxRow)>, bool)> {
    let mut sql = format!("SELECT {READ_COLUMNS} FROM sandboxes s WHERE 1 = 1");
    let mut values: Vec<Value> = Vec::new();
    if let Some(driver) = &query.driver {
        values.push(Value::Text(driver.clone()));
        sql.push_str(&format!(" AND s.driver = ?{}", values.len()));
    }
    if let Some(name) = &query.name {
        values.push(Value::Text(name.clone()));
        sql.push_str(&format!(" AND s.name = ?{}", values.len()));
    }
    if let Some(phase) = query.phase {
        values.push(Value::Text(phase_name(phase).to_owned()));
        sql.push_str(&format!(" AND s.phase = ?{}", values.len()));
    }
    for (key, value) in &query.labels {
        values.push(Value::Text(key.clone()));
        values.push(Value::Text(value.clone()));
        // Driven from the (key, value) index, so a selective label
        // does not scan every row.
        sql.push_str(&format!(
            " AND s.id IN (SELECT l.sandbox_id FROM sandbox_labels l \
             WHERE l.key = ?{} AND l.value = ?{})",
            values.len() - 1,
            values.len()
        ));
    }
    if let Some(after) = &query.after_name {
        values.push(Value::Text(after.clone()));
        sql.push_str(&format!(" AND s.name > ?{}", values.len()));
    }
    let limit = query.limit.max(1);
    values.push(Value::Integer(i64::try_from(limit + 1).unwrap_or(i64::MAX)));
    sql.push_str(&format!(" ORDER BY s.name LIMIT ?{}", values.len()));

    let mut statement = conn
        .prepare_cached(&sql)
        .map_err(|e| Error::store("prepare a list query", e))?;
    let mut cursor = statement
        .query(rusqlite::params_from_iter(values))
        .map_err(|e| Error::store("list sandboxes", e))?;
    let mut rows = Vec::new();
    let mut bytes = 0usize;
    let mut more = false;
    while let Some(row) = cursor
        .next()
        .map_err(|e| Error::store("list sandboxes", e))?
    {
        let size = size_of(row).map_err(|e| Error::store("list sandboxes", e))?;
        let full = rows.len() == limit
            || (query.max_bytes > 0 && !rows.is_empty() && bytes + size > query.max_bytes);
        if full {
            more = true;
            break;
        }
        bytes += size;
        let decoded = decode_row(row)
            .and_then(|r| Ok((seq_of(row)?, r)))
            .map_err(|e| Error::store("list sandboxes", e))?;
        rows.push(decoded);
    }
    Ok((rows, more))
}

/// [`Store::changes_since`] on `conn`, in one read transaction so rows and
/// tombstones are one snapshot.
fn changes_on(
    conn: &Connection,
    cursor: u64,
    driver: Option<&str>,
    name: Option<&str>,
    limit: usize,
    max_bytes: usize,
) -> Result<CatchUp> {
    let read = || -> rusqlite::Result<CatchUp> {
        let after = i64::try_from(cursor).unwrap_or(i64::MAX);
        let take = i64::try_from(limit).unwrap_or(i64::MAX);
        let filters = "(?2 IS NULL OR driver = ?2) AND (?3 IS NULL OR name = ?3)";
        let mut rows_full = false;
        let mut rows: Vec<(u64, Change)> = Vec::new();
        {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {READ_COLUMNS} FROM sandboxes WHERE seq > ?1 AND {filters} \
                 ORDER BY seq LIMIT ?4"
            ))?;
            let mut found = statement.query(params![after, driver, name, take])?;
            let mut bytes = 0usize;
            while let Some(row) = found.next()? {
                let size = size_of(row)?;
                if max_bytes > 0 && !rows.is_empty() && bytes + size > max_bytes {
                    rows_full = true;
                    break;
                }
                bytes += size;
                rows.push((seq_of(row)?, Change::Upsert(Box::new(decode_row(row)?))));
            }
            rows_full |= rows.len() == limit;
        }
        let mut tombs: Vec<(u64, Change)> = {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT seq, id, name, driver FROM tombstones WHERE seq > ?1 AND {filters} \
                 ORDER BY seq LIMIT ?4"
            ))?;
            statement
                .query_map(params![after, driver, name, take], |r| {
                    let seq: i64 = r.get(0)?;
                    Ok((
                        u64::try_from(seq).unwrap_or(0),
                        Change::Deleted {
                            id: r.get(1)?,
                            name: r.get(2)?,
                            driver: r.get(3)?,
                        },
                    ))
                })?
                .collect::<rusqlite::Result<_>>()?
        };
        let tombs_full = tombs.len() == limit;
        // Past the last number of a page that was cut, the other page may
        // miss changes: stop there.
        let bound = [
            rows_full.then(|| rows.last().map(|(s, _)| *s)).flatten(),
            tombs_full.then(|| tombs.last().map(|(s, _)| *s)).flatten(),
        ]
        .into_iter()
        .flatten()
        .min();
        let mut changes = rows;
        changes.append(&mut tombs);
        changes.sort_by_key(|(seq, _)| *seq);
        if let Some(bound) = bound {
            changes.retain(|(seq, _)| *seq <= bound);
        }
        // Complete: every change up to the last one committed (whichever
        // rows it touched) is accounted for.
        let last: i64 = conn.query_row(
            "SELECT max(ifnull((SELECT max(seq) FROM sandboxes), 0), \
                        ifnull((SELECT max(seq) FROM tombstones), 0))",
            [],
            |r| r.get(0),
        )?;
        let last = changes
            .last()
            .map_or(cursor, |(seq, _)| *seq)
            .max(cursor)
            .max(u64::try_from(last).unwrap_or(0));
        Ok(CatchUp {
            changes,
            cursor: bound.unwrap_or(last),
            complete: bound.is_none(),
        })
    };
    conn.execute_batch("BEGIN DEFERRED")
        .map_err(|e| Error::store("begin a read", e))?;
    let result = read();
    let _ = conn.execute_batch("COMMIT");
    result.map_err(|e| Error::store("read changes for a watch", e))
}

/// Moves every row that cannot be read to `quarantined_sandboxes` (with
/// the reason), logging each loudly.
fn quarantine(conn: &mut Connection) -> Result<Vec<Quarantined>> {
    let mut bad = Vec::new();
    {
        let mut statement = conn
            .prepare(&format!("SELECT {READ_COLUMNS}, rowid FROM sandboxes"))
            .map_err(|e| Error::store("prepare the row check", e))?;
        let mut rows = statement
            .query([])
            .map_err(|e| Error::store("check the stored rows", e))?;
        while let Some(row) = rows
            .next()
            .map_err(|e| Error::store("check the stored rows", e))?
        {
            if let Err(error) = decode_row(row).and_then(|_| seq_of(row)) {
                let rowid: i64 = row.get(14).unwrap_or(-1);
                let text = |i: usize| -> String {
                    row.get::<_, String>(i)
                        .unwrap_or_else(|_| "(unreadable)".to_owned())
                };
                bad.push((
                    rowid,
                    Quarantined {
                        id: text(0),
                        name: text(1),
                        driver: text(2),
                        reason: quarantine_reason(&error),
                    },
                ));
            }
        }
    }
    if bad.is_empty() {
        return Ok(Vec::new());
    }
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| Error::store("begin the quarantine", e))?;
    for (rowid, row) in &bad {
        tx.execute(
            &format!(
                "INSERT INTO quarantined_sandboxes ({COLUMNS}, seq, reason, quarantined_at_ms) \
                 SELECT {COLUMNS}, seq, ?2, ?3 FROM sandboxes WHERE rowid = ?1"
            ),
            params![rowid, row.reason, now_ms()],
        )
        .and_then(|_| tx.execute("DELETE FROM sandboxes WHERE rowid = ?1", [rowid]))
        .map_err(|e| Error::store(format!("quarantine sandbox {}", row.id), e))?;
    }
    tx.commit()
        .map_err(|e| Error::store("commit the quarantine", e))?;
    for (_, row) in &bad {
        tracing::error!(
            sandbox = %row.name,
            id = %row.id,
            driver = %row.driver,
            reason = %row.reason,
            "a stored sandbox cannot be read; moved it to the quarantined_sandboxes table of the \
             state database and left it out (its driver may still run it)"
        );
    }
    Ok(bad.into_iter().map(|(_, row)| row).collect())
}

/// What was wrong with a row, in words.
fn quarantine_reason(error: &rusqlite::Error) -> String {
    const FIELDS: [&str; 13] = [
        "id",
        "name",
        "driver",
        "spec",
        "labels",
        "phase",
        "observed",
        "gateway_condition",
        "instance_id",
        "resource_version",
        "created_at_ms",
        "updated_at_ms",
        "seq",
    ];
    match error {
        rusqlite::Error::FromSqlConversionFailure(index, _, cause) => {
            let field = FIELDS.get(*index).copied().unwrap_or("a column");
            format!("{field} cannot be read: {cause}")
        }
        other => other.to_string(),
    }
}

/// An open write transaction (see [`Store::write`]).
pub struct StoreTx<'c> {
    tx: rusqlite::Transaction<'c>,
    /// The number of the last change made in this transaction.
    seq: Cell<u64>,
    changes: RefCell<Vec<(u64, Change)>>,
    removed: Cell<u64>,
}

impl StoreTx<'_> {
    fn next_seq(&self) -> u64 {
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        seq
    }

    pub fn get(&self, id: &str) -> Result<Option<SandboxRow>> {
        let mut statement = self
            .tx
            .prepare_cached(&format!("SELECT {COLUMNS} FROM sandboxes WHERE id = ?1"))
            .map_err(|e| Error::store("prepare a lookup", e))?;
        statement
            .query_row([id], decode_row)
            .optional()
            .map_err(|e| Error::store(format!("read sandbox {id}"), e))
    }

    /// Stores a new row; a taken name is reported, not an error.
    pub fn insert(&self, row: &SandboxRow) -> Result<Inserted> {
        let taken: Option<String> = self
            .tx
            .prepare_cached("SELECT id FROM sandboxes WHERE name = ?1")
            .and_then(|mut s| s.query_row([&row.name], |r| r.get(0)).optional())
            .map_err(|e| Error::store("look up a sandbox name", e))?;
        if let Some(id) = taken {
            return Ok(Inserted::NameTaken(id));
        }
        let seq = self.next_seq();
        self.tx
            .prepare_cached(&format!(
                "INSERT INTO sandboxes ({COLUMNS}, seq) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
            ))
            .and_then(|mut statement| {
                statement.execute(params![
                    row.id,
                    row.name,
                    row.driver,
                    row.spec.encode_to_vec(),
                    labels_json(&row.labels),
                    phase_name(row.phase),
                    row.observed.as_ref().map(prost::Message::encode_to_vec),
                    row.gateway_condition
                        .as_ref()
                        .map(prost::Message::encode_to_vec),
                    row.instance_id,
                    to_i64(row.resource_version),
                    row.created_at_ms,
                    row.updated_at_ms,
                    to_i64(seq),
                ])
            })
            .map_err(|e| Error::store(format!("insert sandbox {}", row.name), e))?;
        {
            let mut label = self
                .tx
                .prepare_cached(
                    "INSERT INTO sandbox_labels (sandbox_id, key, value) VALUES (?1, ?2, ?3)",
                )
                .map_err(|e| Error::store("prepare a label insert", e))?;
            for (key, value) in &row.labels {
                label
                    .execute(params![row.id, key, value])
                    .map_err(|e| Error::store(format!("insert a label of {}", row.name), e))?;
            }
        }
        self.changes
            .borrow_mut()
            .push((seq, Change::Upsert(Box::new(row.clone()))));
        Ok(Inserted::Ok)
    }

    /// Read-modify-write of one row. `change` returns whether it changed
    /// anything; if so the resource version and update time are bumped and
    /// the row is written. Identity, labels and creation time never change.
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut SandboxRow) -> bool,
    ) -> Result<Updated> {
        let Some(mut row) = self.get(id)? else {
            return Ok(Updated::Missing);
        };
        let before = row.clone();
        if !change(&mut row) {
            return Ok(Updated::Unchanged(before));
        }
        row.id = before.id.clone();
        row.name = before.name.clone();
        row.driver = before.driver.clone();
        row.labels = before.labels.clone();
        row.created_at_ms = before.created_at_ms;
        row.resource_version = before.resource_version + 1;
        row.updated_at_ms = now_ms().max(before.updated_at_ms);
        let seq = self.next_seq();
        let mut statement = self
            .tx
            .prepare_cached(
                "UPDATE sandboxes SET spec = ?2, phase = ?3, observed = ?4, gateway_condition = ?5, \
                 instance_id = ?6, resource_version = ?7, updated_at_ms = ?8, seq = ?9 WHERE id = ?1",
            )
            .map_err(|e| Error::store("prepare an update", e))?;
        statement
            .execute(params![
                row.id,
                row.spec.encode_to_vec(),
                phase_name(row.phase),
                row.observed.as_ref().map(prost::Message::encode_to_vec),
                row.gateway_condition
                    .as_ref()
                    .map(prost::Message::encode_to_vec),
                row.instance_id,
                to_i64(row.resource_version),
                row.updated_at_ms,
                to_i64(seq),
            ])
            .map_err(|e| Error::store(format!("update sandbox {}", row.name), e))?;
        self.changes
            .borrow_mut()
            .push((seq, Change::Upsert(Box::new(row.clone()))));
        Ok(Updated::Changed(row))
    }

    /// Deletes a row (and its labels), leaving a tombstone; returns what it
    /// was.
    pub fn remove(&self, id: &str) -> Result<Option<SandboxRow>> {
        let row = self.get(id)?;
        if let Some(row) = &row {
            let seq = self.next_seq();
            self.tx
                .prepare_cached("DELETE FROM sandboxes WHERE id = ?1")
                .and_then(|mut statement| statement.execute([id]))
                .and_then(|_| {
                    self.tx
                        .prepare_cached(
                            "INSERT INTO tombstones (seq, id, name, driver, deleted_at_ms) \
                             VALUES (?1, ?2, ?3, ?4, ?5)",
                        )?
                        .execute(params![to_i64(seq), row.id, row.name, row.driver, now_ms()])
                })
                .map_err(|e| Error::store(format!("delete sandbox {id}"), e))?;
            self.changes.borrow_mut().push((
                seq,
                Change::Deleted {
                    id: row.id.clone(),
                    name: row.name.clone(),
                    driver: row.driver.clone(),
                },
            ));
            self.removed.set(self.removed.get() + 1);
        }
        Ok(row)
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| Error::store("read the schema version", e))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > SCHEMA_VERSION {
        return Err(Error::StoreSchema {
            path: path.to_owned(),
            message: format!(
                "the database has schema version {version}, newer than this gateway knows ({SCHEMA_VERSION}); \
                 run a newer openshell-gateway or point --state-dir elsewhere"
            ),
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let target = index + 1;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
            .map_err(|e| Error::store("begin a migration", e))?;
        tx.execute_batch(sql)
            .map_err(|e| Error::store(format!("apply schema migration {target}"), e))?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(target).unwrap_or(i64::MAX),
        )
        .map_err(|e| Error::store(format!("record schema version {target}"), e))?;
        tx.commit()
            .map_err(|e| Error::store(format!("commit schema migration {target}"), e))?;
        tracing::debug!(version = target, db = %path.display(), "applied schema migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn row(name: &str, driver: &str) -> SandboxRow {
        SandboxRow {
            id: format!("id-{name}"),
            name: name.to_owned(),
            driver: driver.to_owned(),
            spec: gw::SandboxSpec {
                image: "img".into(),
                command: vec!["echo".into(), "hi".into()],
                ..Default::default()
            },
            labels: BTreeMap::from([("team".to_owned(), driver.to_owned())]),
            phase: SandboxPhase::Provisioning,
            observed: None,
            gateway_condition: None,
            instance_id: String::new(),
            resource_version: 1,
            created_at_ms: 1,
            updated_at_ms: 1,
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("gateway.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn insert_get_update_remove() {
        let (_dir, store) = store();
        let a = row("a", "vm");
        assert_eq!(store.insert(&a).unwrap(), Inserted::Ok);
        assert_eq!(store.get("id-a").unwrap().unwrap(), a);
        assert_eq!(store.get_by_name("a").unwrap().unwrap(), a);
        let mut other = row("a", "podman");
        other.id = "id-other".into();
        assert_eq!(
            store.insert(&other).unwrap(),
            Inserted::NameTaken("id-a".into())
        );

        let Updated::Changed(updated) = store
            .update("id-a", |r| {
                r.phase = SandboxPhase::Ready;
                r.driver = "ignored".into();
                true
            })
            .unwrap()
        else {
            panic!("expected a change");
        };
        assert_eq!(updated.resource_version, 2);
        assert_eq!(updated.phase, SandboxPhase::Ready);
        assert_eq!(updated.driver, "vm");
        assert!(
            matches!(store.update("id-a", |_| false).unwrap(), Updated::Unchanged(r) if r.resource_version == 2)
        );
        assert_eq!(store.update("nope", |_| true).unwrap(), Updated::Missing);

        assert_eq!(store.remove("id-a").unwrap().unwrap().name, "a");
        assert!(store.get("id-a").unwrap().is_none());
        assert!(store.remove("id-a").unwrap().is_none());
        // The name is free again.
        assert_eq!(store.insert(&other).unwrap(), Inserted::Ok);
    }

    #[test]
    fn a_failed_batch_writes_nothing() {
        let (_dir, store) = store();
        store.insert(&row("a", "vm")).unwrap();
        store.insert(&row("b", "vm")).unwrap();
        let result: Result<()> = store.write(|tx| {
            tx.update("id-a", |r| {
                r.phase = SandboxPhase::Ready;
                true
            })?;
            tx.remove("id-b")?;
            Err(Error::Internal("stop here".into()))
        });
        assert!(result.is_err());
        assert_eq!(
            store.get("id-a").unwrap().unwrap().phase,
            SandboxPhase::Provisioning
        );
        assert!(store.get("id-b").unwrap().is_some());
        let changed = store
            .write(|tx| {
                let a = tx.update("id-a", |r| {
                    r.phase = SandboxPhase::Ready;
                    true
                })?;
                let b = tx.remove("id-b")?;
                Ok((a, b))
            })
            .unwrap();
        assert!(matches!(changed.0, Updated::Changed(ref r) if r.resource_version == 2));
        assert_eq!(changed.1.unwrap().name, "b");
        assert_eq!(
            store.get("id-a").unwrap().unwrap().phase,
            SandboxPhase::Ready
        );
    }

    #[test]
    fn list_filters_and_pages() {
        let (_dir, store) = store();
        for i in 0..25 {
            let driver = if i % 2 == 0 { "vm" } else { "podman" };
            let mut r = row(&format!("s{i:02}"), driver);
            if i % 5 == 0 {
                r.phase = SandboxPhase::Ready;
                r.labels.insert("tier".into(), "gold".into());
            }
            store.insert(&r).unwrap();
        }
        let page = |query: ListQuery| store.list(&query).unwrap();
        let (rows, more) = page(ListQuery {
            limit: 10,
            ..Default::default()
        });
        assert_eq!(rows.len(), 10);
        assert!(more);
        assert_eq!(rows[0].name, "s00");
        let (rows, more) = page(ListQuery {
            limit: 10,
            after_name: Some("s19".into()),
            ..Default::default()
        });
        assert_eq!(
            rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["s20", "s21", "s22", "s23", "s24"]
        );
        assert!(!more);
        let (rows, _) = page(ListQuery {
            limit: 100,
            driver: Some("vm".into()),
            ..Default::default()
        });
        assert_eq!(rows.len(), 13);
        let (rows, _) = page(ListQuery {
            limit: 100,
            phase: Some(SandboxPhase::Ready),
            driver: Some("podman".into()),
            ..Default::default()
        });
        assert_eq!(
            rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["s05", "s15"]
        );
        let (rows, _) = page(ListQuery {
            limit: 100,
            labels: vec![("tier".into(), "gold".into()), ("team".into(), "vm".into())],
            ..Default::default()
        });
        assert_eq!(
            rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["s00", "s10", "s20"]
        );
        let (rows, _) = page(ListQuery {
            limit: 100,
            labels: vec![("tier".into(), "silver".into())],
            ..Default::default()
        });
        assert!(rows.is_empty());
        assert_eq!(store.rows_of_driver("podman").unwrap().len(), 12);
        assert_eq!(
            store.driver_counts().unwrap(),
            [("podman".to_owned(), 12), ("vm".to_owned(), 13)]
        );
    }

    fn kinds(changes: &[(u64, Change)]) -> Vec<String> {
        changes
            .iter()
            .map(|(_, c)| match c {
                Change::Upsert(row) => format!("{}@{}", row.name, row.resource_version),
                Change::Deleted { name, .. } => format!("-{name}"),
            })
            .collect()
    }

    fn fed(store: &Store, cursor: u64) -> Vec<(u64, Change)> {
        match store.feed().since(cursor, usize::MAX, usize::MAX) {
            Since::Entries(entries) => entries
                .into_iter()
                .map(|e| (e.seq, (*e.change).clone()))
                .collect(),
            Since::Lagged => panic!("lagged"),
        }
    }

    #[test]
    fn changes_are_numbered_and_fed_in_commit_order() {
        let (_dir, store) = store();
        let start = store.feed().head();
        store.insert(&row("a", "vm")).unwrap();
        store.insert(&row("b", "vm")).unwrap();
        store
            .update("id-a", |r| {
                r.phase = SandboxPhase::Ready;
                true
            })
            .unwrap();
        store.update("id-a", |_| false).unwrap();
        store.remove("id-b").unwrap();
        let changes = fed(&store, start);
        assert_eq!(kinds(&changes), ["a@1", "b@1", "a@2", "-b"]);
        let seqs: Vec<u64> = changes.iter().map(|(s, _)| *s).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        assert_eq!(store.feed().head(), *seqs.last().unwrap());
        // A failed batch feeds nothing.
        let failed: Result<()> = store.write(|tx| {
            tx.update("id-a", |r| {
                r.phase = SandboxPhase::Error;
                true
            })?;
            Err(Error::Internal("no".into()))
        });
        assert!(failed.is_err());
        assert_eq!(fed(&store, store.feed().head()).len(), 0);
        // Numbers survive a reopen.
        let path = store.path().to_owned();
        let head = store.feed().head();
        drop(store);
        let store = Store::open(&path).unwrap();
        store.insert(&row("c", "vm")).unwrap();
        assert!(store.feed().head() > head);
    }

    #[test]
    fn catching_up_gives_current_rows_and_deletions_in_order() {
        let (_dir, store) = store();
        let cursor = store.feed().head();
        for name in ["a", "b", "c"] {
            store.insert(&row(name, "vm")).unwrap();
        }
        store.insert(&row("p", "podman")).unwrap();
        store
            .update("id-a", |r| {
                r.phase = SandboxPhase::Ready;
                true
            })
            .unwrap();
        store.remove("id-b").unwrap();
        let all = store
            .changes_since(cursor, None, None, 100, 0)
            .unwrap()
            .unwrap();
        assert!(all.complete);
        // Each sandbox once, as it is now, ordered by its last change.
        assert_eq!(kinds(&all.changes), ["c@1", "p@1", "a@2", "-b"]);
        assert_eq!(all.cursor, store.feed().head());

        let vm = store
            .changes_since(cursor, Some("vm"), None, 100, 0)
            .unwrap()
            .unwrap();
        assert_eq!(kinds(&vm.changes), ["c@1", "a@2", "-b"]);
        assert_eq!(
            vm.cursor,
            store.feed().head(),
            "complete: past other drivers' changes too"
        );
        let named = store
            .changes_since(cursor, None, Some("b"), 100, 0)
            .unwrap()
            .unwrap();
        assert_eq!(kinds(&named.changes), ["-b"]);

        // Page by page, the same sequence.
        let mut paged = Vec::new();
        let mut at = cursor;
        loop {
            let page = store.changes_since(at, None, None, 1, 0).unwrap().unwrap();
            assert!(page.changes.len() <= 2);
            paged.extend(page.changes);
            at = page.cursor;
            if page.complete {
                break;
            }
        }
        assert_eq!(kinds(&paged), kinds(&all.changes));
        // Nothing after the end.
        let after = store.changes_since(at, None, None, 10, 0).unwrap().unwrap();
        assert!(after.changes.is_empty() && after.complete);
        assert_eq!(after.cursor, at);
    }

    #[test]
    fn pruned_tombstones_end_a_catch_up_that_needs_them() {
        let (_dir, store) = store();
        let cursor = store.feed().head();
        for i in 0..5 {
            let name = format!("s{i}");
            store.insert(&row(&name, "vm")).unwrap();
            store.remove(&format!("id-{name}")).unwrap();
        }
        {
            let writer = lock(&store.inner.writer);
            store.prune_tombstones(&writer.conn, 2);
        }
        assert!(
            store
                .changes_since(cursor, None, None, 10, 0)
                .unwrap()
                .is_none()
        );
        let recent = store.inner.tombstone_floor.load(Ordering::SeqCst);
        let left = store
            .changes_since(recent, None, None, 10, 0)
            .unwrap()
            .unwrap();
        assert_eq!(kinds(&left.changes), ["-s3", "-s4"]);
    }

    #[test]
    fn the_feed_keeps_a_bounded_window() {
        let (_dir, store) = store();
        let start = store.feed().head();
        for i in 0..3 {
            store.insert(&row(&format!("s{i}"), "vm")).unwrap();
        }
        // Many changes: the oldest leave the ring.
        let big = "x".repeat(64 * 1024);
        for i in 0..300 {
            store
                .update("id-s0", |r| {
                    r.spec.command = vec![big.clone(), i.to_string()];
                    true
                })
                .unwrap();
        }
        assert!(matches!(
            store.feed().since(start, 10, usize::MAX),
            Since::Lagged
        ));
        let head = store.feed().head();
        assert!(matches!(
            store.feed().since(head, 10, usize::MAX),
            Since::Entries(e) if e.is_empty()
        ));
        // One page is bounded by bytes, with at least one change.
        let Since::Entries(page) = store.feed().since(head - 5, 10, 1000) else {
            panic!("lagged");
        };
        assert_eq!(page.len(), 1);
    }

    #[test]
    fn list_pages_are_bounded_by_bytes() {
        let (_dir, store) = store();
        for i in 0..10 {
            let mut r = row(&format!("s{i}"), "vm");
            r.spec.command = vec!["x".repeat(10_000)];
            store.insert(&r).unwrap();
        }
        let (rows, more) = store
            .list(&ListQuery {
                limit: 100,
                max_bytes: 35_000,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(rows.len(), 3);
        assert!(more);
        let (rows, more) = store
            .list(&ListQuery {
                limit: 100,
                max_bytes: 1,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(rows.len(), 1, "a page holds at least one row");
        assert!(more);
        let (rows, _) = store
            .list(&ListQuery {
                limit: 100,
                name: Some("s7".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(rows[0].name, "s7");
    }

    #[test]
    fn unreadable_rows_are_quarantined_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.db");
        {
            let store = Store::open(&path).unwrap();
            for name in ["good", "bad-spec", "bad-phase", "bad-labels"] {
                store.insert(&row(name, "vm")).unwrap();
            }
        }
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "UPDATE sandboxes SET spec = X'FFFFFFFF' WHERE name = 'bad-spec';
                 UPDATE sandboxes SET phase = 'Melted' WHERE name = 'bad-phase';
                 UPDATE sandboxes SET labels = '{not json' WHERE name = 'bad-labels';",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let mut set_aside: Vec<(String, String)> = store
            .quarantined()
            .iter()
            .map(|q| (q.name.clone(), q.reason.clone()))
            .collect();
        set_aside.sort();
        assert_eq!(set_aside.len(), 3, "{set_aside:?}");
        assert!(
            set_aside[0].0 == "bad-labels" && set_aside[0].1.starts_with("labels cannot be read")
        );
        assert!(
            set_aside[1].0 == "bad-phase" && set_aside[1].1.contains("unknown phase \"Melted\"")
        );
        assert!(set_aside[2].0 == "bad-spec" && set_aside[2].1.starts_with("spec cannot be read"));
        let (rows, _) = store
            .list(&ListQuery {
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].name, "good");
        assert_eq!(store.rows_of_driver("vm").unwrap().len(), 1);
        drop(store);
        let conn = Connection::open(&path).unwrap();
        let kept: i64 = conn
            .query_row("SELECT count(*) FROM quarantined_sandboxes", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(kept, 3);
        // Opening again finds nothing more to set aside.
        assert!(Store::open(&path).unwrap().quarantined().is_empty());
    }

    #[test]
    fn reopening_keeps_rows_and_refuses_newer_schemas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.db");
        {
            let store = Store::open(&path).unwrap();
            store.insert(&row("keep", "vm")).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get_by_name("keep").unwrap().unwrap().driver, "vm");
        drop(store);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let message = Store::open(&path).unwrap_err().to_string();
        assert!(message.contains("schema version 99"), "{message}");
    }
}
