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
//! for a writer (WAL).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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
];

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
    /// Only names after this one (exclusive), for paging.
    pub after_name: Option<String>,
    pub limit: usize,
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

struct Inner {
    path: PathBuf,
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
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

fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    conn.lock().unwrap_or_else(PoisonError::into_inner)
}

const COLUMNS: &str = "id, name, driver, spec, labels, phase, observed, gateway_condition, \
                       instance_id, resource_version, created_at_ms, updated_at_ms";

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
    /// Opens (creating with mode 0600 if needed) and migrates the database.
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
        let reader = open()?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                writer: Mutex::new(writer),
                reader: Mutex::new(reader),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Stores a new row; a taken name is reported, not an error.
    pub fn insert(&self, row: &SandboxRow) -> Result<Inserted> {
        let mut conn = lock(&self.inner.writer);
        let tx = conn
            .transaction()
            .map_err(|e| Error::store("begin a transaction", e))?;
        let taken: Option<String> = tx
            .query_row(
                "SELECT id FROM sandboxes WHERE name = ?1",
                [&row.name],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| Error::store("look up a sandbox name", e))?;
        if let Some(id) = taken {
            return Ok(Inserted::NameTaken(id));
        }
        tx.execute(
            &format!("INSERT INTO sandboxes ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
            params![
                row.id,
                row.name,
                row.driver,
                row.spec.encode_to_vec(),
                labels_json(&row.labels),
                phase_name(row.phase),
                row.observed.as_ref().map(prost::Message::encode_to_vec),
                row.gateway_condition.as_ref().map(prost::Message::encode_to_vec),
                row.instance_id,
                to_i64(row.resource_version),
                row.created_at_ms,
                row.updated_at_ms,
            ],
        )
        .map_err(|e| Error::store(format!("insert sandbox {}", row.name), e))?;
        {
            let mut label = tx
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
        tx.commit()
            .map_err(|e| Error::store(format!("commit sandbox {}", row.name), e))?;
        Ok(Inserted::Ok)
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
    /// rolled back otherwise.
    pub fn write<T>(&self, work: impl FnOnce(&StoreTx<'_>) -> Result<T>) -> Result<T> {
        let mut conn = lock(&self.inner.writer);
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| Error::store("begin a transaction", e))?;
        let store_tx = StoreTx { tx };
        let value = work(&store_tx)?;
        store_tx
            .tx
            .commit()
            .map_err(|e| Error::store("commit a transaction", e))?;
        Ok(value)
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
        let mut sql = format!("SELECT {COLUMNS} FROM sandboxes s WHERE 1 = 1");
        let mut values: Vec<Value> = Vec::new();
        if let Some(driver) = &query.driver {
            values.push(Value::Text(driver.clone()));
            sql.push_str(&format!(" AND s.driver = ?{}", values.len()));
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

        let conn = lock(&self.inner.reader);
        let mut statement = conn
            .prepare_cached(&sql)
            .map_err(|e| Error::store("prepare a list query", e))?;
        let mut rows: Vec<SandboxRow> = statement
            .query_map(rusqlite::params_from_iter(values), decode_row)
            .and_then(Iterator::collect)
            .map_err(|e| Error::store("list sandboxes", e))?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        Ok((rows, more))
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
}

/// An open write transaction (see [`Store::write`]).
pub struct StoreTx<'c> {
    tx: rusqlite::Transaction<'c>,
}

impl StoreTx<'_> {
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
        let mut statement = self
            .tx
            .prepare_cached(
                "UPDATE sandboxes SET spec = ?2, phase = ?3, observed = ?4, gateway_condition = ?5, \
                 instance_id = ?6, resource_version = ?7, updated_at_ms = ?8 WHERE id = ?1",
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
            ])
            .map_err(|e| Error::store(format!("update sandbox {}", row.name), e))?;
        Ok(Updated::Changed(row))
    }

    /// Deletes a row (and its labels); returns what it was.
    pub fn remove(&self, id: &str) -> Result<Option<SandboxRow>> {
        let row = self.get(id)?;
        if row.is_some() {
            self.tx
                .prepare_cached("DELETE FROM sandboxes WHERE id = ?1")
                .and_then(|mut statement| statement.execute([id]))
                .map_err(|e| Error::store(format!("delete sandbox {id}"), e))?;
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
