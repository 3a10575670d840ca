//! API keys: minting (`sk-adapterd-` + 64 hex digits from the OS CSPRNG), hashing (SHA-256 hex,
//! the only form stored), and the `adapterd keys create|list|revoke` subcommands, which open the
//! configured database without loading the model. HTTP authentication lives in `api::auth`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use rand::TryRngCore;
use sha2::{Digest, Sha256};
use sqlx::SqlitePool;

use crate::adapters::{now_rfc3339, validate_name};
use crate::config::{Overrides, Settings};
use crate::store::keys::{self as q, KeyRow};

/// Every key starts with this, so a leaked one is recognisable (and greppable) as ours.
pub const KEY_PREFIX: &str = "sk-adapterd-";

/// Random bytes in a key's secret part (256 bits).
const SECRET_BYTES: usize = 32;

/// A key just created: `key` is shown once and never stored.
#[derive(Clone, Debug)]
pub struct NewKey {
    pub id: String,
    pub tenant: String,
    pub key: String,
}

/// What is stored and looked up for a presented key.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng
        .try_fill_bytes(&mut buf)
        .context("reading the operating system's random number generator")?;
    Ok(hex::encode(buf))
}

/// Mints a key for `tenant` (created if missing) and stores its hash.
pub async fn create(db: &SqlitePool, tenant: &str) -> anyhow::Result<NewKey> {
    validate_name("tenant", tenant).map_err(|e| anyhow::anyhow!("{e}"))?;
    let key = format!("{KEY_PREFIX}{}", random_hex(SECRET_BYTES)?);
    let id = format!("key_{}", random_hex(8)?);
    let now = now_rfc3339();
    crate::store::tenants::ensure(db, tenant, &now).await?;
    q::insert(db, &id, tenant, &hash_key(&key), &now).await?;
    Ok(NewKey {
        id,
        tenant: tenant.to_owned(),
        key,
    })
}

pub async fn list(db: &SqlitePool) -> anyhow::Result<Vec<KeyRow>> {
    Ok(q::list(db).await?)
}

/// Revokes key `id`; returns its row as it now is. An unknown id is an error; revoking a key
/// twice keeps the first revocation time.
pub async fn revoke(db: &SqlitePool, id: &str) -> anyhow::Result<KeyRow> {
    q::revoke(db, id, &now_rfc3339()).await?;
    match q::find(db, id).await? {
        Some(row) => Ok(row),
        None => bail!("no API key with id `{id}`; `adapterd keys list` shows the ids"),
    }
}

/// `adapterd keys …`: manage API keys in the configured database.
#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    /// Settings file (TOML) whose keys override config/default.toml.
    #[arg(long, env = "ADAPTERD_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// SQLite URL, e.g. sqlite://data/adapterd.db.
    #[arg(long, env = "ADAPTERD_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    #[command(subcommand)]
    pub action: KeysAction,
}

#[derive(Debug, clap::Subcommand)]
pub enum KeysAction {
    /// Create a key for a tenant (the tenant is created if missing); prints the key once.
    Create {
        /// Tenant name: [a-z0-9][a-z0-9._-]{0,63}.
        #[arg(long)]
        tenant: String,
    },
    /// List keys: id, tenant, created, revoked. Never shows a key.
    List,
    /// Revoke a key by id; requests with it are refused from then on.
    Revoke {
        /// The key's id as `keys create` and `keys list` show it.
        id: String,
    },
}

/// Runs a `keys` subcommand against the configured database; returns what to print.
pub async fn run_cli(args: &KeysArgs) -> anyhow::Result<String> {
    let overrides = Overrides {
        config: args.config.clone(),
        database_url: args.database_url.clone(),
        ..Default::default()
    };
    let settings = Settings::load(&overrides)?;
    let db = crate::store::connect(&settings.storage.database_url).await?;
    let out = run_action(&db, &args.action).await;
    db.close().await;
    out
}

async fn run_action(db: &SqlitePool, action: &KeysAction) -> anyhow::Result<String> {
    match action {
        KeysAction::Create { tenant } => {
            let k = create(db, tenant).await?;
            Ok(format!(
                "{}\nid: {}\ntenant: {}\nStore this key now: it is not shown again.\n",
                k.key, k.id, k.tenant
            ))
        }
        KeysAction::List => {
            let mut out = format!(
                "{:<22} {:<24} {:<21} {}\n",
                "ID", "TENANT", "CREATED", "REVOKED"
            );
            for k in list(db).await? {
                out.push_str(&format!(
                    "{:<22} {:<24} {:<21} {}\n",
                    k.id,
                    k.tenant,
                    k.created_at,
                    k.revoked_at.as_deref().unwrap_or("-")
                ));
            }
            Ok(out)
        }
        KeysAction::Revoke { id } => {
            let k = revoke(db, id).await?;
            Ok(format!(
                "revoked {} (tenant {}) at {}\n",
                k.id,
                k.tenant,
                k.revoked_at.as_deref().unwrap_or("-")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn temp_db() -> (tempfile::TempDir, SqlitePool) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("k.db").display());
        let db = crate::store::connect(&url).await.unwrap();
        (dir, db)
    }

    #[tokio::test]
    async fn a_created_key_is_stored_only_as_its_hash_and_resolves_to_its_tenant() {
        let (_dir, db) = temp_db().await;
        let k = create(&db, "acme").await.unwrap();
        assert!(k.key.starts_with(KEY_PREFIX));
        assert_eq!(k.key.len(), KEY_PREFIX.len() + 2 * SECRET_BYTES);
        assert!(crate::store::tenants::exists(&db, "acme").await.unwrap());
        let stored: Vec<String> = sqlx::query_scalar("SELECT key_hash FROM api_keys")
            .fetch_all(&db)
            .await
            .unwrap();
        assert_eq!(stored, vec![hash_key(&k.key)]);
        assert!(!stored[0].contains(&k.key[KEY_PREFIX.len()..]));
        let t = q::tenant_by_hash(&db, &hash_key(&k.key)).await.unwrap();
        assert_eq!(t.as_deref(), Some("acme"));
        let other = create(&db, "acme").await.unwrap();
        assert_ne!(other.key, k.key);
        assert_ne!(other.id, k.id);
    }

    #[tokio::test]
    async fn a_revoked_key_no_longer_resolves_and_unknown_ids_are_errors() {
        let (_dir, db) = temp_db().await;
        let k = create(&db, "acme").await.unwrap();
        let row = revoke(&db, &k.id).await.unwrap();
        let first = row.revoked_at.clone().unwrap();
        assert_eq!(
            q::tenant_by_hash(&db, &hash_key(&k.key)).await.unwrap(),
            None
        );
        assert_eq!(revoke(&db, &k.id).await.unwrap().revoked_at, Some(first));
        let err = revoke(&db, "key_nope").await.unwrap_err().to_string();
        assert!(err.contains("key_nope"), "{err}");
        assert_eq!(q::count_active(&db).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn bad_tenant_names_are_refused() {
        let (_dir, db) = temp_db().await;
        for bad in ["", "Acme", "../x", "a/b", "ѕupport"] {
            assert!(create(&db, bad).await.is_err(), "{bad:?}");
        }
        assert!(list(&db).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_cli_prints_a_key_once_and_lists_without_it() {
        let (_dir, db) = temp_db().await;
        let out = run_action(
            &db,
            &KeysAction::Create {
                tenant: "acme".into(),
            },
        )
        .await
        .unwrap();
        let key = out.lines().next().unwrap().to_owned();
        assert!(key.starts_with(KEY_PREFIX));
        let id = out
            .lines()
            .find_map(|l| l.strip_prefix("id: "))
            .unwrap()
            .to_owned();
        let listed = run_action(&db, &KeysAction::List).await.unwrap();
        assert!(listed.contains(&id) && listed.contains("acme"));
        assert!(!listed.contains(&key), "the list never shows a key");
        let revoked = run_action(&db, &KeysAction::Revoke { id: id.clone() })
            .await
            .unwrap();
        assert!(revoked.contains(&id));
        let listed = run_action(&db, &KeysAction::List).await.unwrap();
        let line = listed.lines().find(|l| l.contains(&id)).unwrap();
        assert!(!line.trim_end().ends_with('-'), "{line}");
        assert!(run_action(&db, &KeysAction::Revoke { id: "key_x".into() })
            .await
            .is_err());
    }
}
