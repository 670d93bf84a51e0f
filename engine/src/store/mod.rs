//! kiln's state: an SQLite database `KILN_HOME/kiln.db` (schema versioned by `user_version`,
//! migrated on open; WAL and a busy timeout so several `kiln` processes can use it at once) and
//! the artifacts beside it: `KILN_HOME/artifacts/` (managed images, gallery image versions),
//! `KILN_HOME/staging/` (the staging directories of runs).
//!
//! Invariants:
//! - A published artifact (managed image, image version and its replicas) is visible only once
//!   its files are complete: files are written under a temporary name, renamed, and only then is
//!   the row committed. A row always points at complete, read-only files.
//! - Resource IDs are ARM-shaped and compared case-insensitively (the `key` columns).
//! - A run in `Running`/`Canceling` has an owning process (`pid`, `pid_start`); when that process
//!   is gone, the next `kiln` command marks the run `Failed` ([`Store::recover`], in `runs`).

pub mod ids;
pub mod lease;
pub mod runs;

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What went wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("the state database {path}: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the path.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The database was written by a newer kiln.
    #[error("the state database {path} has schema version {found}; this kiln knows up to {known}: use a newer kiln")]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// Ours.
        known: i64,
    },
    /// A resource does not exist (Azure's `ResourceNotFound` / `ResourceGroupNotFound`).
    #[error("{code}: {message}")]
    NotFound {
        /// Azure's error code.
        code: &'static str,
        /// The message.
        message: String,
    },
    /// The request conflicts with the state (Azure's `Conflict`, `InvalidPropertyUpdate`, …).
    #[error("{code}: {message}")]
    Conflict {
        /// Azure's (or kiln's) error code.
        code: &'static str,
        /// The message, with the fix.
        message: String,
    },
}

impl StoreError {
    /// Azure's error code for this error (for `--output json` and docs/diagnostics.md).
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Db { .. } | StoreError::Io { .. } | StoreError::TooNew { .. } => {
                "StoreError"
            }
            StoreError::NotFound { code, .. } | StoreError::Conflict { code, .. } => code,
        }
    }
}

/// The newest schema.
pub const SCHEMA_VERSION: i64 = 2;

const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE resource_groups (
  key TEXT PRIMARY KEY, subscription TEXT NOT NULL, name TEXT NOT NULL, location TEXT NOT NULL,
  tags TEXT NOT NULL DEFAULT '{}', managed_by TEXT, created TEXT NOT NULL);
CREATE TABLE templates (
  key TEXT PRIMARY KEY, id TEXT NOT NULL, subscription TEXT NOT NULL, resource_group TEXT NOT NULL, name TEXT NOT NULL,
  location TEXT NOT NULL, api_version TEXT NOT NULL, submitted TEXT NOT NULL, normalized TEXT NOT NULL,
  template_dir TEXT NOT NULL, staging_rg TEXT NOT NULL, staging_created INTEGER NOT NULL,
  provisioning_state TEXT NOT NULL, provisioning_error TEXT, created TEXT NOT NULL, updated TEXT NOT NULL);
CREATE TABLE runs (
  id TEXT PRIMARY KEY, template_key TEXT NOT NULL, run_state TEXT NOT NULL, run_sub_state TEXT NOT NULL,
  message TEXT NOT NULL DEFAULT '', start_time TEXT NOT NULL, end_time TEXT, pid INTEGER, pid_start INTEGER,
  run_dir TEXT NOT NULL, exact_version TEXT);
CREATE INDEX runs_by_template ON runs(template_key, start_time);
CREATE TABLE run_outputs (
  run_id TEXT NOT NULL, name TEXT NOT NULL, artifact_id TEXT, artifact_uri TEXT, provisioning_state TEXT NOT NULL,
  PRIMARY KEY (run_id, name));
CREATE TABLE images (
  key TEXT PRIMARY KEY, id TEXT NOT NULL, subscription TEXT NOT NULL, resource_group TEXT NOT NULL, name TEXT NOT NULL,
  location TEXT NOT NULL, os_type TEXT NOT NULL, hyper_v_generation TEXT NOT NULL, disk TEXT NOT NULL,
  tags TEXT NOT NULL DEFAULT '{}', source_run TEXT, created TEXT NOT NULL);
CREATE TABLE galleries (
  key TEXT PRIMARY KEY, id TEXT NOT NULL, subscription TEXT NOT NULL, resource_group TEXT NOT NULL, name TEXT NOT NULL,
  location TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE image_definitions (
  key TEXT PRIMARY KEY, id TEXT NOT NULL, gallery_key TEXT NOT NULL, name TEXT NOT NULL, location TEXT NOT NULL,
  publisher TEXT NOT NULL, offer TEXT NOT NULL, sku TEXT NOT NULL, os_type TEXT NOT NULL,
  hyper_v_generation TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE image_versions (
  key TEXT PRIMARY KEY, id TEXT NOT NULL, definition_key TEXT NOT NULL, name TEXT NOT NULL,
  major INTEGER NOT NULL, minor INTEGER NOT NULL, patch INTEGER NOT NULL, exclude_from_latest INTEGER NOT NULL,
  location TEXT NOT NULL, tags TEXT NOT NULL DEFAULT '{}', source_run TEXT, created TEXT NOT NULL);
CREATE TABLE replicas (
  version_key TEXT NOT NULL, region TEXT NOT NULL, replica_count INTEGER NOT NULL, storage_account_type TEXT NOT NULL,
  disk TEXT NOT NULL, PRIMARY KEY (version_key, region));
"#,
    // 2: how a stored image is provisioned (the method its build used, then its source's others),
    //    as a JSON list of kiln's method names (`["azure"]`); `[]` for rows written before.
    r#"
ALTER TABLE images ADD COLUMN provisioning TEXT NOT NULL DEFAULT '[]';
ALTER TABLE image_versions ADD COLUMN provisioning TEXT NOT NULL DEFAULT '[]';
"#,
];

/// The store. One per command; cheap to open.
pub struct Store {
    conn: Connection,
    home: PathBuf,
    path: PathBuf,
}

/// A resource group.
#[derive(Debug, Clone)]
pub struct Group {
    /// Subscription.
    pub subscription: String,
    /// Name as created.
    pub name: String,
    /// Location.
    pub location: String,
    /// Tags.
    pub tags: Value,
    /// The template ID whose staging this group is (created by kiln for `stagingResourceGroup`).
    pub managed_by: Option<String>,
}

impl Group {
    /// Azure's JSON (`az group show`).
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::json!({
            "id": ids::group_id(&self.subscription, &self.name),
            "location": self.location,
            "managedBy": self.managed_by,
            "name": self.name,
            "properties": {"provisioningState": "Succeeded"},
            "tags": self.tags,
            "type": "Microsoft.Resources/resourceGroups"
        });
        if self.tags.as_object().is_some_and(|o| o.is_empty()) {
            v["tags"] = Value::Null;
        }
        v
    }
}

/// An image template as stored.
#[derive(Debug, Clone)]
pub struct TemplateRow {
    /// Its ARM ID.
    pub id: String,
    /// Subscription.
    pub subscription: String,
    /// Resource group.
    pub resource_group: String,
    /// Name.
    pub name: String,
    /// Location.
    pub location: String,
    /// The API version it was created with.
    pub api_version: String,
    /// The JSON as submitted (verbatim).
    pub submitted: Value,
    /// The normalized template (canonical names, defaults).
    pub normalized: Value,
    /// Where relative script paths resolve.
    pub template_dir: PathBuf,
    /// The staging resource group's name (`IT_…` or the template's `stagingResourceGroup`).
    pub staging_rg: String,
    /// Whether kiln created that staging (and so deletes it with the template).
    pub staging_created: bool,
    /// `Succeeded` or `Failed`.
    pub provisioning_state: String,
    /// `provisioningError`, when creation failed.
    pub provisioning_error: Option<Value>,
}

/// A run as stored.
#[derive(Debug, Clone)]
pub struct RunRow {
    /// The run id.
    pub id: String,
    /// The template's key.
    pub template_key: String,
    /// AIB runState.
    pub run_state: String,
    /// AIB runSubState.
    pub run_sub_state: String,
    /// The message.
    pub message: String,
    /// RFC 3339.
    pub start_time: String,
    /// RFC 3339, when ended.
    pub end_time: Option<String>,
    /// The owning kiln process.
    pub pid: Option<i64>,
    /// Its start time (clock ticks since boot; guards against PID reuse).
    pub pid_start: Option<i64>,
    /// The run's directory.
    pub run_dir: PathBuf,
    /// The source's exactVersion (resolved `latest`).
    pub exact_version: Option<String>,
}

impl RunRow {
    /// Still in progress.
    pub fn is_active(&self) -> bool {
        matches!(self.run_state.as_str(), "Running" | "Canceling")
    }

    /// AIB's `lastRunStatus`.
    pub fn last_run_status(&self) -> Value {
        let mut v = serde_json::json!({
            "startTime": self.start_time,
            "runState": self.run_state,
            "runSubState": self.run_sub_state,
            "message": self.message,
        });
        if let Some(e) = &self.end_time {
            v["endTime"] = Value::String(e.clone());
        } else {
            v["endTime"] = Value::String("0001-01-01T00:00:00Z".into());
        }
        v
    }
}

/// A runOutput as stored.
#[derive(Debug, Clone)]
pub struct RunOutputRow {
    /// The runOutputName.
    pub name: String,
    /// `artifactId` (images, versions).
    pub artifact_id: Option<String>,
    /// `artifactUri` (VHDs).
    pub artifact_uri: Option<String>,
    /// `Succeeded` or `Failed`.
    pub provisioning_state: String,
}

/// A managed image.
#[derive(Debug, Clone)]
pub struct ImageRow {
    /// ARM ID.
    pub id: String,
    /// Subscription.
    pub subscription: String,
    /// Resource group.
    pub resource_group: String,
    /// Name.
    pub name: String,
    /// Location.
    pub location: String,
    /// Linux or Windows.
    pub os_type: String,
    /// V1 or V2.
    pub hyper_v_generation: String,
    /// The fixed VHD (read-only).
    pub disk: PathBuf,
    /// Tags.
    pub tags: Value,
    /// The run that produced it.
    pub source_run: Option<String>,
    /// RFC 3339.
    pub created: String,
    /// Provisioning methods a build from it uses, preferred first (`nocloud`, `azure`,
    /// `unattend`); empty: unknown (written by an older kiln).
    pub provisioning: Vec<String>,
}

/// A gallery.
#[derive(Debug, Clone)]
pub struct GalleryRow {
    /// ARM ID.
    pub id: String,
    /// Subscription.
    pub subscription: String,
    /// Resource group.
    pub resource_group: String,
    /// Name.
    pub name: String,
    /// Location.
    pub location: String,
}

/// An image definition.
#[derive(Debug, Clone)]
pub struct DefinitionRow {
    /// ARM ID.
    pub id: String,
    /// The gallery's ID key.
    pub gallery_key: String,
    /// Name.
    pub name: String,
    /// Location.
    pub location: String,
    /// Publisher.
    pub publisher: String,
    /// Offer.
    pub offer: String,
    /// SKU.
    pub sku: String,
    /// Linux or Windows.
    pub os_type: String,
    /// V1 or V2.
    pub hyper_v_generation: String,
}

/// A replica of an image version in one region.
#[derive(Debug, Clone)]
pub struct ReplicaRow {
    /// Region name.
    pub region: String,
    /// replicaCount.
    pub replica_count: i64,
    /// storageAccountType.
    pub storage_account_type: String,
    /// The region's file.
    pub disk: PathBuf,
}

/// An image version.
#[derive(Debug, Clone)]
pub struct VersionRow {
    /// ARM ID.
    pub id: String,
    /// The definition's key.
    pub definition_key: String,
    /// `major.minor.patch`.
    pub name: String,
    /// Parsed version.
    pub version: (i64, i64, i64),
    /// excludeFromLatest.
    pub exclude_from_latest: bool,
    /// Location (the gallery's).
    pub location: String,
    /// Tags (artifactTags).
    pub tags: Value,
    /// The run that produced it.
    pub source_run: Option<String>,
    /// RFC 3339.
    pub created: String,
    /// Per-region replicas.
    pub replicas: Vec<ReplicaRow>,
    /// Provisioning methods, as [`ImageRow::provisioning`].
    pub provisioning: Vec<String>,
}

fn now() -> String {
    crate::build::time::now_rfc3339()
}

fn json_col(s: String) -> Value {
    serde_json::from_str(&s).unwrap_or(Value::Null)
}

fn list_col(s: String) -> Vec<String> {
    serde_json::from_str(&s).unwrap_or_default()
}

/// Parses `major.minor.patch` (each a non-negative integer, as galleries require).
pub fn parse_version(s: &str) -> Option<(i64, i64, i64)> {
    let p: Vec<&str> = s.split('.').collect();
    if p.len() != 3 {
        return None;
    }
    let n = |x: &str| {
        if !x.is_empty() && x.len() <= 10 && x.bytes().all(|b| b.is_ascii_digit()) {
            x.parse::<i64>().ok().filter(|v| *v <= i64::from(i32::MAX))
        } else {
            None
        }
    };
    Some((n(p[0])?, n(p[1])?, n(p[2])?))
}

impl Store {
    /// Opens (creating and migrating) the store in `home`.
    pub fn open(home: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(home).map_err(|source| StoreError::Io {
            what: format!("creating {}", home.display()),
            source,
        })?;
        let path = home.join("kiln.db");
        let db = |source| StoreError::Db {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(db)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
        let mut store = Store {
            conn,
            home: home.to_path_buf(),
            path: path.clone(),
        };
        store.migrate()?;
        Ok(store)
    }

    fn db(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let db = |source| StoreError::Db {
            path: path.clone(),
            source,
        };
        // IMMEDIATE: two processes opening a fresh home do not both migrate.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db)?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: path.clone(),
                found: version,
                known: SCHEMA_VERSION,
            });
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(m).map_err(db)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    /// The kiln home.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The schema version in use.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.db())
    }

    /// The raw connection (for the modules of the store).
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The default subscription: `KILN_SUBSCRIPTION_ID`, else one generated once and kept.
    pub fn subscription(&self) -> Result<(String, &'static str), StoreError> {
        if let Some(s) = std::env::var("KILN_SUBSCRIPTION_ID")
            .ok()
            .filter(|s| !s.trim().is_empty())
        {
            return Ok((s.trim().to_string(), "KILN_SUBSCRIPTION_ID"));
        }
        let fresh = random_guid();
        self.conn
            .execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('subscription', ?1)",
                params![fresh],
            )
            .map_err(self.db())?;
        let s: String = self
            .conn
            .query_row("SELECT value FROM meta WHERE key='subscription'", [], |r| {
                r.get(0)
            })
            .map_err(self.db())?;
        Ok((s, "generated"))
    }

    // ---- resource groups ----

    /// Creates a resource group (`az group create`: idempotent for the same location).
    pub fn create_group(
        &self,
        sub: &str,
        name: &str,
        location: &str,
        tags: &Value,
        managed_by: Option<&str>,
    ) -> Result<Group, StoreError> {
        if name.is_empty()
            || name.len() > 90
            || name.ends_with('.')
            || !name
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '(' | ')'))
        {
            return Err(StoreError::Conflict {
                code: "InvalidResourceGroupName",
                message: format!("resource group name `{name}`: 1-90 letters, digits, '-', '_', '.', '(' or ')', not ending in '.'"),
            });
        }
        if let Some(g) = self.group(sub, name)? {
            if !g.location.eq_ignore_ascii_case(location) {
                return Err(StoreError::Conflict {
                    code: "InvalidResourceGroupLocation",
                    message: format!("Invalid resource group location '{location}'. The Resource group already exists in location '{}'.", g.location),
                });
            }
            self.conn
                .execute(
                    "UPDATE resource_groups SET tags=?2 WHERE key=?1",
                    params![ids::key(&ids::group_id(sub, name)), tags.to_string()],
                )
                .map_err(self.db())?;
            return self.group(sub, name)?.ok_or_else(|| not_found_group(name));
        }
        self.conn
            .execute(
                "INSERT INTO resource_groups(key, subscription, name, location, tags, managed_by, created) VALUES (?1,?2,?3,?4,?5,?6,?7)",
                params![ids::key(&ids::group_id(sub, name)), sub, name, location, tags.to_string(), managed_by, now()],
            )
            .map_err(self.db())?;
        self.group(sub, name)?.ok_or_else(|| not_found_group(name))
    }

    /// A resource group.
    pub fn group(&self, sub: &str, name: &str) -> Result<Option<Group>, StoreError> {
        self.conn
            .query_row(
                "SELECT subscription, name, location, tags, managed_by FROM resource_groups WHERE key=?1",
                params![ids::key(&ids::group_id(sub, name))],
                |r| Ok(Group { subscription: r.get(0)?, name: r.get(1)?, location: r.get(2)?, tags: json_col(r.get(3)?), managed_by: r.get(4)? }),
            )
            .optional()
            .map_err(self.db())
    }

    /// A resource group that must exist (Azure's `ResourceGroupNotFound`).
    pub fn require_group(&self, sub: &str, name: &str) -> Result<Group, StoreError> {
        self.group(sub, name)?.ok_or_else(|| not_found_group(name))
    }

    /// Every resource group of a subscription.
    pub fn groups(&self, sub: &str) -> Result<Vec<Group>, StoreError> {
        let mut st = self.conn.prepare("SELECT subscription, name, location, tags, managed_by FROM resource_groups WHERE subscription=?1 ORDER BY name").map_err(self.db())?;
        let rows = st
            .query_map(params![sub], |r| {
                Ok(Group {
                    subscription: r.get(0)?,
                    name: r.get(1)?,
                    location: r.get(2)?,
                    tags: json_col(r.get(3)?),
                    managed_by: r.get(4)?,
                })
            })
            .map_err(self.db())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.db())
    }

    /// What a resource group holds: IDs of its templates, images, galleries.
    pub fn group_contents(&self, sub: &str, name: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for table in ["templates", "images", "galleries"] {
            let mut st = self.conn.prepare(&format!("SELECT id FROM {table} WHERE lower(subscription)=lower(?1) AND lower(resource_group)=lower(?2) ORDER BY id")).map_err(self.db())?;
            let rows = st
                .query_map(params![sub, name], |r| r.get::<_, String>(0))
                .map_err(self.db())?;
            for r in rows {
                out.push(r.map_err(self.db())?);
            }
        }
        Ok(out)
    }

    /// Deletes an empty resource group.
    pub fn delete_group(&self, sub: &str, name: &str) -> Result<(), StoreError> {
        self.require_group(sub, name)?;
        let contents = self.group_contents(sub, name)?;
        if !contents.is_empty() {
            return Err(StoreError::Conflict {
                code: "ResourceGroupNotEmpty",
                message: format!(
                    "resource group `{name}` holds {} resource(s): {}; delete them first (kiln does not delete resources in bulk)",
                    contents.len(),
                    contents.join(", ")
                ),
            });
        }
        self.conn
            .execute(
                "DELETE FROM resource_groups WHERE key=?1",
                params![ids::key(&ids::group_id(sub, name))],
            )
            .map_err(self.db())?;
        Ok(())
    }

    // ---- templates ----

    /// Inserts a new template row.
    pub fn insert_template(&self, t: &TemplateRow) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO templates(key, id, subscription, resource_group, name, location, api_version, submitted, normalized, template_dir, staging_rg, staging_created, provisioning_state, provisioning_error, created, updated)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?15)",
                params![
                    ids::key(&t.id),
                    t.id,
                    t.subscription,
                    t.resource_group,
                    t.name,
                    t.location,
                    t.api_version,
                    t.submitted.to_string(),
                    t.normalized.to_string(),
                    t.template_dir.display().to_string(),
                    t.staging_rg,
                    t.staging_created,
                    t.provisioning_state,
                    t.provisioning_error.as_ref().map(|v| v.to_string()),
                    now()
                ],
            )
            .map_err(self.db())?;
        if n == 0 {
            return Err(StoreError::Conflict {
                code: "Conflict",
                message: format!("the template {} already exists", t.id),
            });
        }
        Ok(())
    }

    /// Replaces the mutable parts of a template (update, or `kiln build` re-registering).
    pub fn update_template(&self, t: &TemplateRow) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE templates SET location=?2, api_version=?3, submitted=?4, normalized=?5, template_dir=?6, provisioning_state=?7, provisioning_error=?8, updated=?9, staging_rg=?10, staging_created=?11 WHERE key=?1",
                params![
                    ids::key(&t.id),
                    t.location,
                    t.api_version,
                    t.submitted.to_string(),
                    t.normalized.to_string(),
                    t.template_dir.display().to_string(),
                    t.provisioning_state,
                    t.provisioning_error.as_ref().map(|v| v.to_string()),
                    now(),
                    t.staging_rg,
                    t.staging_created
                ],
            )
            .map_err(self.db())?;
        Ok(())
    }

    fn template_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TemplateRow> {
        Ok(TemplateRow {
            id: r.get(0)?,
            subscription: r.get(1)?,
            resource_group: r.get(2)?,
            name: r.get(3)?,
            location: r.get(4)?,
            api_version: r.get(5)?,
            submitted: json_col(r.get(6)?),
            normalized: json_col(r.get(7)?),
            template_dir: PathBuf::from(r.get::<_, String>(8)?),
            staging_rg: r.get(9)?,
            staging_created: r.get(10)?,
            provisioning_state: r.get(11)?,
            provisioning_error: r.get::<_, Option<String>>(12)?.map(json_col),
        })
    }

    const TEMPLATE_COLS: &'static str =
        "id, subscription, resource_group, name, location, api_version, submitted, normalized, template_dir, staging_rg, staging_created, provisioning_state, provisioning_error";

    /// A template by ID.
    pub fn template(&self, id: &str) -> Result<Option<TemplateRow>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {} FROM templates WHERE key=?1", Self::TEMPLATE_COLS),
                params![ids::key(id)],
                Self::template_from_row,
            )
            .optional()
            .map_err(self.db())
    }

    /// A template that must exist.
    pub fn require_template(
        &self,
        sub: &str,
        rg: &str,
        name: &str,
    ) -> Result<TemplateRow, StoreError> {
        self.require_group(sub, rg)?;
        self.template(&ids::template_id(sub, rg, name))?.ok_or_else(|| StoreError::NotFound {
            code: "ResourceNotFound",
            message: format!("The Resource 'Microsoft.VirtualMachineImages/imageTemplates/{name}' under resource group '{rg}' was not found."),
        })
    }

    /// Templates of a subscription, or of one resource group.
    pub fn templates(&self, sub: &str, rg: Option<&str>) -> Result<Vec<TemplateRow>, StoreError> {
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT {} FROM templates WHERE lower(subscription)=lower(?1) AND (?2 IS NULL OR lower(resource_group)=lower(?2)) ORDER BY resource_group, name",
                Self::TEMPLATE_COLS
            ))
            .map_err(self.db())?;
        let rows = st
            .query_map(params![sub, rg], Self::template_from_row)
            .map_err(self.db())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.db())
    }

    /// The template using `staging_rg` as its staging, if any.
    pub fn template_with_staging(&self, staging_rg: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row(
                "SELECT id FROM templates WHERE lower(staging_rg)=lower(?1)",
                params![staging_rg],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())
    }

    /// Deletes a template row, its runs and their runOutputs.
    pub fn delete_template_rows(&self, id: &str) -> Result<(), StoreError> {
        let key = ids::key(id);
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .and_then(|_| self.conn.execute("DELETE FROM run_outputs WHERE run_id IN (SELECT id FROM runs WHERE template_key=?1)", params![key]))
            .and_then(|_| self.conn.execute("DELETE FROM runs WHERE template_key=?1", params![key]))
            .and_then(|_| self.conn.execute("DELETE FROM templates WHERE key=?1", params![key]))
            .and_then(|_| self.conn.execute_batch("COMMIT"))
            .map(|_| ())
            .map_err(|e| {
                let _ = self.conn.execute_batch("ROLLBACK");
                StoreError::Db { path: self.path.clone(), source: e }
            })
    }

    // ---- managed images ----

    fn image_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRow> {
        Ok(ImageRow {
            id: r.get(0)?,
            subscription: r.get(1)?,
            resource_group: r.get(2)?,
            name: r.get(3)?,
            location: r.get(4)?,
            os_type: r.get(5)?,
            hyper_v_generation: r.get(6)?,
            disk: PathBuf::from(r.get::<_, String>(7)?),
            tags: json_col(r.get(8)?),
            source_run: r.get(9)?,
            created: r.get(10)?,
            provisioning: list_col(r.get(11)?),
        })
    }

    const IMAGE_COLS: &'static str = "id, subscription, resource_group, name, location, os_type, hyper_v_generation, disk, tags, source_run, created, provisioning";

    /// Commits a managed image whose disk is complete. Fails if the ID exists.
    pub fn insert_image(&self, i: &ImageRow) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                &format!("INSERT OR IGNORE INTO images(key, {}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13)", Self::IMAGE_COLS),
                params![
                    ids::key(&i.id),
                    i.id,
                    i.subscription,
                    i.resource_group,
                    i.name,
                    i.location,
                    i.os_type,
                    i.hyper_v_generation,
                    i.disk.display().to_string(),
                    i.tags.to_string(),
                    i.source_run,
                    i.created,
                    serde_json::to_string(&i.provisioning).unwrap_or_else(|_| "[]".into())
                ],
            )
            .map_err(self.db())?;
        if n == 0 {
            return Err(StoreError::Conflict {
                code: "Conflict",
                message: format!("the managed image {} already exists; delete it first (`kiln image delete --ids {}`) or choose another imageId", i.id, i.id),
            });
        }
        Ok(())
    }

    /// A managed image by ID.
    pub fn image(&self, id: &str) -> Result<Option<ImageRow>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {} FROM images WHERE key=?1", Self::IMAGE_COLS),
                params![ids::key(id)],
                Self::image_from_row,
            )
            .optional()
            .map_err(self.db())
    }

    /// Managed images (of a resource group).
    pub fn images(&self, sub: &str, rg: Option<&str>) -> Result<Vec<ImageRow>, StoreError> {
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT {} FROM images WHERE lower(subscription)=lower(?1) AND (?2 IS NULL OR lower(resource_group)=lower(?2)) ORDER BY resource_group, name",
                Self::IMAGE_COLS
            ))
            .map_err(self.db())?;
        let rows = st
            .query_map(params![sub, rg], Self::image_from_row)
            .map_err(self.db())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.db())
    }

    /// Deletes a managed image's row and its files.
    pub fn delete_image(&self, id: &str) -> Result<ImageRow, StoreError> {
        let img = self.image(id)?.ok_or_else(|| StoreError::NotFound {
            code: "ResourceNotFound",
            message: format!("the managed image {id} was not found"),
        })?;
        let _lease = Self::lease_for_delete(&img.disk, &format!("the managed image {id}"))?;
        self.conn
            .execute("DELETE FROM images WHERE key=?1", params![ids::key(id)])
            .map_err(self.db())?;
        if let Some(dir) = img.disk.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(img)
    }

    /// The exclusive lease a delete holds while it removes a stored disk; refused while a build
    /// boots from it (see [`lease`]).
    fn lease_for_delete(disk: &Path, what: &str) -> Result<Option<std::fs::File>, StoreError> {
        match lease::exclusive_now(disk).map_err(|source| StoreError::Io {
            what: format!("locking {}", disk.display()),
            source,
        })? {
            lease::Exclusive::Held(f) => Ok(Some(f)),
            lease::Exclusive::Missing => Ok(None),
            lease::Exclusive::InUse => Err(StoreError::Conflict {
                code: "OperationNotAllowed",
                message: format!(
                    "{what} is the source of a build that is running now ({}); wait for it to end or cancel it (`kiln template cancel`, or stop `kiln build`), then delete",
                    disk.display()
                ),
            }),
        }
    }

    /// Deletes an image version (an exact version, not `latest`): its rows and its replica files.
    pub fn delete_version(&self, id: &str) -> Result<VersionRow, StoreError> {
        let v = match ids::ResourceId::parse(id) {
            Some(p) if !p.name().eq_ignore_ascii_case("latest") => self.version(id)?,
            _ => None,
        }
        .ok_or_else(|| StoreError::NotFound {
            code: "ResourceNotFound",
            message: format!("the image version {id} was not found (give an exact version; `latest` is not deleted)"),
        })?;
        let mut leases = Vec::new();
        for r in &v.replicas {
            leases.push(Self::lease_for_delete(
                &r.disk,
                &format!("the image version {}", v.id),
            )?);
        }
        let key = ids::key(&v.id);
        let r = (|| -> rusqlite::Result<()> {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            self.conn
                .execute("DELETE FROM replicas WHERE version_key=?1", params![key])?;
            self.conn
                .execute("DELETE FROM image_versions WHERE key=?1", params![key])?;
            self.conn.execute_batch("COMMIT")
        })();
        if let Err(source) = r {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(StoreError::Db {
                path: self.path.clone(),
                source,
            });
        }
        for r in &v.replicas {
            if let Some(dir) = r.disk.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        drop(leases);
        Ok(v)
    }

    // ---- galleries ----

    /// Creates a gallery (idempotent).
    pub fn create_gallery(
        &self,
        sub: &str,
        rg: &str,
        name: &str,
        location: &str,
    ) -> Result<GalleryRow, StoreError> {
        self.require_group(sub, rg)?;
        let id = ids::gallery_id(sub, rg, name);
        self.conn
            .execute(
                "INSERT OR IGNORE INTO galleries(key, id, subscription, resource_group, name, location, created) VALUES (?1,?2,?3,?4,?5,?6,?7)",
                params![ids::key(&id), id, sub, rg, name, location, now()],
            )
            .map_err(self.db())?;
        self.gallery(&id)?.ok_or_else(|| StoreError::NotFound {
            code: "ResourceNotFound",
            message: id,
        })
    }

    /// A gallery by ID.
    pub fn gallery(&self, id: &str) -> Result<Option<GalleryRow>, StoreError> {
        self.conn
            .query_row("SELECT id, subscription, resource_group, name, location FROM galleries WHERE key=?1", params![ids::key(id)], |r| {
                Ok(GalleryRow { id: r.get(0)?, subscription: r.get(1)?, resource_group: r.get(2)?, name: r.get(3)?, location: r.get(4)? })
            })
            .optional()
            .map_err(self.db())
    }

    /// Galleries (of a resource group).
    pub fn galleries(&self, sub: &str, rg: Option<&str>) -> Result<Vec<GalleryRow>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id, subscription, resource_group, name, location FROM galleries WHERE lower(subscription)=lower(?1) AND (?2 IS NULL OR lower(resource_group)=lower(?2)) ORDER BY name")
            .map_err(self.db())?;
        let rows = st
            .query_map(params![sub, rg], |r| {
                Ok(GalleryRow {
                    id: r.get(0)?,
                    subscription: r.get(1)?,
                    resource_group: r.get(2)?,
                    name: r.get(3)?,
                    location: r.get(4)?,
                })
            })
            .map_err(self.db())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.db())
    }

    /// Creates an image definition in an existing gallery. An existing definition with other
    /// identifiers is an error (as on Azure: they are immutable).
    pub fn create_definition(&self, d: &DefinitionRow) -> Result<DefinitionRow, StoreError> {
        if self.gallery(&d.gallery_key)?.is_none() {
            return Err(StoreError::NotFound {
                code: "ParentResourceNotFound",
                message: format!(
                    "the gallery {} was not found; create it with `kiln sig create`",
                    d.gallery_key
                ),
            });
        }
        if let Some(old) = self.definition(&d.id)? {
            if (
                old.publisher.as_str(),
                old.offer.as_str(),
                old.sku.as_str(),
                old.os_type.as_str(),
            ) != (
                d.publisher.as_str(),
                d.offer.as_str(),
                d.sku.as_str(),
                d.os_type.as_str(),
            ) || !old
                .hyper_v_generation
                .eq_ignore_ascii_case(&d.hyper_v_generation)
            {
                return Err(StoreError::Conflict {
                    code: "PropertyChangeNotAllowed",
                    message: format!("Changing property 'galleryImage.properties.identifier' is not allowed (image definition {})", d.id),
                });
            }
            return Ok(old);
        }
        self.conn
            .execute(
                "INSERT INTO image_definitions(key, id, gallery_key, name, location, publisher, offer, sku, os_type, hyper_v_generation, created) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11)",
                params![ids::key(&d.id), d.id, ids::key(&d.gallery_key), d.name, d.location, d.publisher, d.offer, d.sku, d.os_type, d.hyper_v_generation, now()],
            )
            .map_err(self.db())?;
        self.definition(&d.id)?.ok_or_else(|| StoreError::NotFound {
            code: "ResourceNotFound",
            message: d.id.clone(),
        })
    }

    fn definition_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DefinitionRow> {
        Ok(DefinitionRow {
            id: r.get(0)?,
            gallery_key: r.get(1)?,
            name: r.get(2)?,
            location: r.get(3)?,
            publisher: r.get(4)?,
            offer: r.get(5)?,
            sku: r.get(6)?,
            os_type: r.get(7)?,
            hyper_v_generation: r.get(8)?,
        })
    }

    /// An image definition by ID.
    pub fn definition(&self, id: &str) -> Result<Option<DefinitionRow>, StoreError> {
        self.conn
            .query_row(
                "SELECT id, gallery_key, name, location, publisher, offer, sku, os_type, hyper_v_generation FROM image_definitions WHERE key=?1",
                params![ids::key(id)],
                Self::definition_from_row,
            )
            .optional()
            .map_err(self.db())
    }

    /// The definitions of a gallery.
    pub fn definitions(&self, gallery_id: &str) -> Result<Vec<DefinitionRow>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id, gallery_key, name, location, publisher, offer, sku, os_type, hyper_v_generation FROM image_definitions WHERE gallery_key=?1 ORDER BY name")
            .map_err(self.db())?;
        let rows = st
            .query_map(params![ids::key(gallery_id)], Self::definition_from_row)
            .map_err(self.db())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.db())
    }

    /// The versions of a definition, oldest version number first.
    pub fn versions(&self, definition_id: &str) -> Result<Vec<VersionRow>, StoreError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, definition_key, name, major, minor, patch, exclude_from_latest, location, tags, source_run, created, key, provisioning FROM image_versions WHERE definition_key=?1 ORDER BY major, minor, patch",
            )
            .map_err(self.db())?;
        let rows = st
            .query_map(params![ids::key(definition_id)], |r| {
                Ok((
                    VersionRow {
                        id: r.get(0)?,
                        definition_key: r.get(1)?,
                        name: r.get(2)?,
                        version: (r.get(3)?, r.get(4)?, r.get(5)?),
                        exclude_from_latest: r.get(6)?,
                        location: r.get(7)?,
                        tags: json_col(r.get(8)?),
                        source_run: r.get(9)?,
                        created: r.get(10)?,
                        replicas: Vec::new(),
                        provisioning: list_col(r.get(12)?),
                    },
                    r.get::<_, String>(11)?,
                ))
            })
            .map_err(self.db())?;
        let mut out = Vec::new();
        for row in rows {
            let (mut v, key) = row.map_err(self.db())?;
            let mut rs = self.conn.prepare("SELECT region, replica_count, storage_account_type, disk FROM replicas WHERE version_key=?1 ORDER BY rowid").map_err(self.db())?;
            let reps = rs
                .query_map(params![key], |r| {
                    Ok(ReplicaRow {
                        region: r.get(0)?,
                        replica_count: r.get(1)?,
                        storage_account_type: r.get(2)?,
                        disk: PathBuf::from(r.get::<_, String>(3)?),
                    })
                })
                .map_err(self.db())?;
            for rep in reps {
                v.replicas.push(rep.map_err(self.db())?);
            }
            out.push(v);
        }
        Ok(out)
    }

    /// One version, by ID; `…/versions/latest` resolves to the highest version not excluded from
    /// latest.
    pub fn version(&self, id: &str) -> Result<Option<VersionRow>, StoreError> {
        let Some(parsed) = ids::ResourceId::parse(id) else {
            return Ok(None);
        };
        let name = parsed.name().to_string();
        let def_id = id
            .trim()
            .trim_end_matches('/')
            .rsplit_once('/')
            .and_then(|(a, _)| a.rsplit_once('/'))
            .map(|(a, _)| a.to_string())
            .unwrap_or_default();
        let versions = self.versions(&def_id)?;
        if name.eq_ignore_ascii_case("latest") {
            return Ok(versions.into_iter().rev().find(|v| !v.exclude_from_latest));
        }
        Ok(versions.into_iter().find(|v| v.name == name))
    }

    /// Commits a version whose replica files are complete, in one transaction.
    pub fn insert_version(&self, v: &VersionRow) -> Result<(), StoreError> {
        let key = ids::key(&v.id);
        let r = (|| -> rusqlite::Result<usize> {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            let n = self.conn.execute(
                "INSERT OR IGNORE INTO image_versions(key, id, definition_key, name, major, minor, patch, exclude_from_latest, location, tags, source_run, created, provisioning) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13)",
                params![key, v.id, v.definition_key, v.name, v.version.0, v.version.1, v.version.2, v.exclude_from_latest, v.location, v.tags.to_string(), v.source_run, v.created, serde_json::to_string(&v.provisioning).unwrap_or_else(|_| "[]".into())],
            )?;
            if n == 1 {
                for rep in &v.replicas {
                    self.conn.execute(
                        "INSERT INTO replicas(version_key, region, replica_count, storage_account_type, disk) VALUES (?1,?2,?3,?4,?5)",
                        params![key, rep.region, rep.replica_count, rep.storage_account_type, rep.disk.display().to_string()],
                    )?;
                }
            }
            self.conn.execute_batch("COMMIT")?;
            Ok(n)
        })();
        match r {
            Ok(1) => Ok(()),
            Ok(_) => Err(StoreError::Conflict {
                code: "Conflict",
                message: format!("the image version {} already exists", v.id),
            }),
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(StoreError::Db {
                    path: self.path.clone(),
                    source: e,
                })
            }
        }
    }

    /// Where artifacts live.
    pub fn artifacts_dir(&self) -> PathBuf {
        self.home.join("artifacts")
    }

    /// Where staging directories live.
    pub fn staging_root(&self) -> PathBuf {
        self.home.join("staging")
    }
}

fn not_found_group(name: &str) -> StoreError {
    StoreError::NotFound { code: "ResourceGroupNotFound", message: format!("Resource group '{name}' could not be found. Create it with `kiln group create -n {name} -l LOCATION`.") }
}

/// A random GUID (v4 shape) from the OS's randomness.
pub fn random_guid() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    if b == [0u8; 16] {
        use sha2::{Digest, Sha256};
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let h = Sha256::digest(format!("{nanos}-{}", std::process::id()).as_bytes());
        b.copy_from_slice(&h[..16]);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A short random id (8 hex digits) for staging names.
pub fn short_id() -> String {
    random_guid()[..8].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(label: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-store-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn migrates_once_and_reopens() {
        let d = tmp("migrate");
        let s = Store::open(&d).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        drop(s);
        let s = Store::open(&d).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        let mode: String = s
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_version_1_store_gains_provisioning_columns() {
        let d = tmp("migrate-v1");
        std::fs::create_dir_all(&d).unwrap();
        {
            let c = Connection::open(d.join("kiln.db")).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.execute_batch("PRAGMA user_version = 1").unwrap();
            c.execute(
                "INSERT INTO images(key, id, subscription, resource_group, name, location, os_type, hyper_v_generation, disk, created) VALUES ('/x','/x','s','rg','n','westus','Linux','V1','/d','t')",
                [],
            )
            .unwrap();
        }
        let s = Store::open(&d).unwrap();
        assert_eq!(s.schema_version().unwrap(), 2);
        let img = s.image("/x").unwrap().expect("the old row");
        assert!(img.provisioning.is_empty(), "unknown for old rows");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let d = tmp("newer");
        let s = Store::open(&d).unwrap();
        s.conn
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(s);
        let e = Store::open(&d).err().unwrap();
        assert!(matches!(e, StoreError::TooNew { .. }), "{e}");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn groups_are_case_insensitive_and_location_checked() {
        let d = tmp("groups");
        let s = Store::open(&d).unwrap();
        s.create_group("sub", "MyRG", "westus", &serde_json::json!({}), None)
            .unwrap();
        assert_eq!(s.group("sub", "myrg").unwrap().unwrap().name, "MyRG");
        assert_eq!(
            s.create_group("sub", "myrg", "eastus", &serde_json::json!({}), None)
                .unwrap_err()
                .code(),
            "InvalidResourceGroupLocation"
        );
        assert_eq!(
            s.create_group("sub", "bad/name", "eastus", &serde_json::json!({}), None)
                .unwrap_err()
                .code(),
            "InvalidResourceGroupName"
        );
        s.delete_group("sub", "MYRG").unwrap();
        assert!(s.group("sub", "MyRG").unwrap().is_none());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn subscription_is_generated_once() {
        let d = tmp("sub");
        let s = Store::open(&d).unwrap();
        if std::env::var("KILN_SUBSCRIPTION_ID").is_err() {
            let a = s.subscription().unwrap();
            let b = Store::open(&d).unwrap().subscription().unwrap();
            assert_eq!(a, b);
            assert_eq!(a.0.len(), 36);
        }
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn versions_and_latest() {
        let d = tmp("versions");
        let s = Store::open(&d).unwrap();
        s.create_group("sub", "rg", "westus", &serde_json::json!({}), None)
            .unwrap();
        let g = s.create_gallery("sub", "rg", "gal", "westus").unwrap();
        let def_id = ids::definition_id("sub", "rg", "gal", "def");
        let def = DefinitionRow {
            id: def_id.clone(),
            gallery_key: g.id.clone(),
            name: "def".into(),
            location: "westus".into(),
            publisher: "p".into(),
            offer: "o".into(),
            sku: "s".into(),
            os_type: "Linux".into(),
            hyper_v_generation: "V1".into(),
        };
        s.create_definition(&def).unwrap();
        let mut other = def.clone();
        other.sku = "x".into();
        assert_eq!(
            s.create_definition(&other).unwrap_err().code(),
            "PropertyChangeNotAllowed"
        );
        for (name, excl) in [("1.0.0", false), ("1.2.0", false), ("1.10.0", true)] {
            let v = VersionRow {
                id: ids::version_id("sub", "rg", "gal", "def", name),
                definition_key: ids::key(&def_id),
                name: name.into(),
                version: parse_version(name).unwrap(),
                exclude_from_latest: excl,
                location: "westus".into(),
                tags: serde_json::json!({}),
                source_run: None,
                created: now(),
                replicas: vec![ReplicaRow {
                    region: "westus".into(),
                    replica_count: 1,
                    storage_account_type: "Standard_LRS".into(),
                    disk: {
                        let f = d.join("regions").join(name).join("disk.vhd");
                        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                        std::fs::write(&f, name).unwrap();
                        f
                    },
                }],
                provisioning: vec!["azure".into(), "nocloud".into()],
            };
            s.insert_version(&v).unwrap();
            assert_eq!(s.insert_version(&v).unwrap_err().code(), "Conflict");
        }
        let all = s.versions(&def_id).unwrap();
        assert_eq!(
            all.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ["1.0.0", "1.2.0", "1.10.0"]
        );
        assert_eq!(all[0].replicas.len(), 1);
        assert_eq!(all[0].provisioning, ["azure", "nocloud"]);
        let latest = s
            .version(&format!("{}/versions/latest", def_id.to_uppercase()))
            .unwrap()
            .unwrap();
        assert_eq!(latest.name, "1.2.0");
        // Deleting: refused while a build holds the replica; then rows and files go, and
        // `latest` moves back; `latest` itself is never a delete target.
        let v12 = ids::version_id("sub", "rg", "gal", "def", "1.2.0");
        let build = lease::shared(&latest.replicas[0].disk).unwrap();
        assert_eq!(
            s.delete_version(&v12).unwrap_err().code(),
            "OperationNotAllowed"
        );
        assert!(s.version(&v12).unwrap().is_some());
        drop(build);
        let gone = s.delete_version(&v12.to_uppercase()).unwrap();
        assert!(!gone.replicas[0].disk.exists());
        assert!(s.version(&v12).unwrap().is_none());
        assert_eq!(
            s.version(&format!("{def_id}/versions/latest"))
                .unwrap()
                .unwrap()
                .name,
            "1.0.0"
        );
        assert_eq!(
            s.delete_version(&format!("{def_id}/versions/latest"))
                .unwrap_err()
                .code(),
            "ResourceNotFound"
        );
        assert_eq!(
            s.delete_version(&v12).unwrap_err().code(),
            "ResourceNotFound"
        );
        assert_eq!(s.versions(&def_id).unwrap().len(), 2);
        assert_eq!(parse_version("1.2"), None);
        assert_eq!(parse_version("1.2.x"), None);
        let _ = std::fs::remove_dir_all(d);
    }
}
