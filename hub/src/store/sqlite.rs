//! The SQLite backend: one file, WAL, the hub's default.

use std::path::Path;

use rusqlite::types::ValueRef;
use rusqlite::{params_from_iter, Connection, ToSql};

use super::{Arg, Backend, Sql, StoreError};

pub struct Sqlite {
    conn: Connection,
}

impl Sqlite {
    pub fn open(path: &Path) -> Result<Sqlite, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        Ok(Sqlite { conn })
    }
}

impl ToSql for Arg {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(match self {
            Arg::Int(i) => (*i).into(),
            Arg::Text(t) => t.as_str().into(),
            Arg::Null => rusqlite::types::Null.into(),
        })
    }
}

/// `$1` (PostgreSQL's and this store's) as `?1` (SQLite's numbered form, same meaning).
fn numbered(sql: &str) -> String {
    sql.replace('$', "?")
}

struct Tx<'c>(rusqlite::Transaction<'c>);

impl Sql for Tx<'_> {
    fn exec(&mut self, sql: &str, args: &[Arg]) -> Result<u64, StoreError> {
        let n = self.0.execute(&numbered(sql), params_from_iter(args))?;
        Ok(n as u64)
    }

    fn rows(&mut self, sql: &str, args: &[Arg]) -> Result<Vec<Vec<Arg>>, StoreError> {
        let mut stmt = self.0.prepare(&numbered(sql))?;
        let width = stmt.column_count();
        let rows = stmt.query_map(params_from_iter(args), |row| {
            (0..width)
                .map(|i| {
                    Ok(match row.get_ref(i)? {
                        ValueRef::Integer(v) => Arg::Int(v),
                        ValueRef::Text(t) => Arg::Text(String::from_utf8_lossy(t).into_owned()),
                        ValueRef::Null => Arg::Null,
                        ValueRef::Real(r) => Arg::Int(r as i64),
                        ValueRef::Blob(b) => Arg::Text(String::from_utf8_lossy(b).into_owned()),
                    })
                })
                .collect::<rusqlite::Result<Vec<Arg>>>()
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn for_update(&self) -> &'static str {
        ""
    }

    fn commit(self: Box<Self>) -> Result<(), StoreError> {
        Ok(self.0.commit()?)
    }
}

impl Backend for Sqlite {
    fn begin(&mut self) -> Result<Box<dyn Sql + '_>, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        Ok(Box::new(Tx(tx)))
    }
}
